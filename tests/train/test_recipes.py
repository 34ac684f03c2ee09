"""The named FitConfig presets (``train/recipes.py``): their values, fresh copies, and a
"choose one of" error."""

from __future__ import annotations

import pytest

from tensorcut.errors import TensorcutError
from tensorcut.train.config import FitConfig
from tensorcut.train.recipes import (
    FINETUNE_RECIPE,
    RECIPES,
    RSDTR_RECIPE,
    get_recipe,
    list_recipes,
)


def test_the_thesis_recipe_is_adam_1e5_with_early_stopping():
    r = get_recipe("thesis")
    assert r == FINETUNE_RECIPE
    assert (r.epochs, r.optimizer, r.lr, r.scheduler, r.patience) == (50, "adam", 1e-5, "none", 3)


def test_the_rsdtr_recipe_is_the_papers_one_cycle_sgd():
    r = get_recipe("rsdtr")
    assert r == RSDTR_RECIPE
    assert (r.epochs, r.optimizer, r.lr) == (160, "sgd", 0.01)
    assert (r.momentum, r.weight_decay) == (0.9, 1e-4)
    assert (r.scheduler, r.patience) == ("onecycle", None)


def test_get_recipe_returns_a_copy():
    r = get_recipe("thesis")
    r.lr = 0.5
    assert FINETUNE_RECIPE.lr == 1e-5 and get_recipe("thesis").lr == 1e-5


def test_unknown_recipe_names_the_choices():
    with pytest.raises(TensorcutError) as e:
        get_recipe("fast")
    assert str(e.value) == "unknown recipe 'fast'; choose one of: thesis, rsdtr"


def test_list_and_table_agree():
    assert list_recipes() == list(RECIPES) == ["thesis", "rsdtr"]
    assert all(isinstance(r, FitConfig) for r in RECIPES.values())


def test_the_finetune_verb_uses_the_same_presets():
    """pipeline/workflow.py's RECIPES are these (until it imports them from here)."""
    from tensorcut.pipeline.workflow import RECIPES as VERB_RECIPES

    assert VERB_RECIPES == RECIPES
