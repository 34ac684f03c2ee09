"""Safe checkpoints: ``DIR/model.safetensors`` + ``DIR/meta.json``, written atomically.

Nothing here unpickles a user's file. ``meta.json`` names the architecture (registry
name and arguments) and, for compressed models, the configuration of every factorized
layer, so :func:`load` rebuilds the exact module tree with no user code — for models in
tensorcut's registry (the zoo, or any architecture added with
``tensorcut.models.register_model``). A checkpoint of another architecture (a timm or
torchvision network, your own class) reloads with ``load(DIR, model=fresh_instance)``: the
recorded factorized layers are re-applied to that instance and the weights loaded into it.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorcut.checkpoint.meta import EDITED, CheckpointMeta, ModelSpec
from tensorcut.errors import TensorcutError

__all__ = [
    "Checkpoint",
    "atomic_write_bytes",
    "atomic_write_text",
    "json_default",
    "load",
    "load_checkpoint",
    "read_info",
    "read_meta",
    "save",
    "versions",
]

WEIGHTS = "model.safetensors"
META = "meta.json"
FORMAT = "tensorcut-checkpoint"
FORMAT_VERSION = 1


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename: never half-written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise TensorcutError(
            f"cannot write {path}: {e.strerror}; choose a writable output directory"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the mode a plain open() would
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise TensorcutError(
            f"cannot write {path}: {e.strerror}; free disk space or choose another directory"
        ) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def versions() -> dict[str, str]:
    """Versions of the software that produced a file, for reports and metadata."""
    from tensorcut import __version__

    return {
        "tensorcut": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model and its metadata (``meta``, the ``meta.json``
    object; :attr:`info`, the same typed)."""

    model: nn.Module
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def info(self) -> CheckpointMeta:
        """The metadata, typed and checked: model, data set, lineage, metrics, history."""
        return CheckpointMeta.from_meta(self.meta)


def _factorized_configs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Configurations of every registered factorized layer (any module with ``method`` and
    ``config()``); a layer reachable under several names is recorded once, its other names as
    ``{"alias_of": first}``."""
    out: dict[str, dict[str, Any]] = {}
    first: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if name and getattr(type(m), "method", "") and callable(getattr(m, "config", None)):
            if any(name.startswith(f + ".") for f in first.values()):
                continue  # inside a factorized layer reached under another name
            if id(m) in first:
                out[name] = {"alias_of": first[id(m)]}
            else:
                first[id(m)] = name
                out[name] = m.config()
    return out


def _unshared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict on the CPU with tensors that share memory (shared modules) copied apart,
    as safetensors requires; loading writes the same values through every name."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in model.state_dict().items():
        t = v.detach().contiguous().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out


def save(model: nn.Module, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Save ``model`` to ``directory`` (weights as safetensors, architecture and metadata as JSON).

    Args:
        model: any module; factorized layers are recorded under ``meta['layers']`` automatically.
        directory: the checkpoint folder (created; files written atomically, the weights first so
            that a complete ``meta.json`` implies complete weights).
        meta: metadata with ``model: {name, kwargs}`` (the registry name that rebuilds it); default:
            the class name, which reloads with ``load(directory, model=YourClass(...))``.

    Returns:
        ``directory`` as a Path.

    Raises:
        TensorcutError: ``meta`` lacks ``model.name``/``model.kwargs``, holds a value JSON cannot
            store, or a field :func:`load` would refuse; checked before anything is written.

    Example:
        >>> tensorcut.save(compressed, "runs/mine-tucker2")
    """
    from safetensors.torch import save as st_save

    directory = Path(directory)
    if meta is None:
        meta = {"model": {"name": type(model).__name__, "kwargs": {}}}
    try:
        ModelSpec.from_meta(meta)
    except TensorcutError:
        raise TensorcutError(
            "checkpoint metadata needs model.name (the registry name) and model.kwargs"
        ) from None
    meta = dict(
        meta, format=FORMAT, format_version=FORMAT_VERSION, layers=_factorized_configs(model)
    )
    meta.setdefault("versions", versions())
    try:  # serialise the metadata first: a bad value must not leave weights without meta.json
        meta_text = json.dumps(meta, indent=2, sort_keys=True, default=json_default)
    except (TypeError, ValueError) as e:
        raise TensorcutError(
            f"checkpoint metadata is not JSON-serialisable ({e}); pass plain numbers, strings, "
            "lists and dicts"
        ) from None
    # what load will read back: refused now in one line, not after the weights are written
    CheckpointMeta.from_meta(json.loads(meta_text), "checkpoint metadata", fix=SAVE_FIX)
    state = _unshared_state(model)
    atomic_write_bytes(directory / WEIGHTS, st_save(state))
    atomic_write_text(directory / META, meta_text)
    return directory


#: the fix-it tail of a metadata field that :func:`save` refuses
SAVE_FIX = "give it the shape tensorcut writes, or keep your own value under another key"


def json_default(o: Any) -> Any:
    """``json.dumps``'s ``default`` for checkpoint metadata: sets and tuples as lists, paths as
    strings, numpy/torch scalars as numbers; anything else is refused (TypeError)."""
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def read_meta(directory: str | Path) -> dict[str, Any]:
    """Read and check ``DIR/meta.json``; the parsed object (:func:`read_info`: the same, typed)."""
    return _read(Path(directory))[0]


def read_info(directory: str | Path) -> CheckpointMeta:
    """Read and check ``DIR/meta.json``, typed (:class:`CheckpointMeta`) without loading weights."""
    return _read(Path(directory))[1]


def _read(directory: Path) -> tuple[dict[str, Any], CheckpointMeta]:
    """``DIR/meta.json`` parsed and checked: the object and its typed view."""
    if not directory.is_dir():
        raise TensorcutError(
            f"{directory} is not a checkpoint directory (expected a folder with {WEIGHTS} and "
            f"{META})"
        )
    p = directory / META
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TensorcutError(
            f"{directory} has no {META}; it is not a tensorcut checkpoint"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorcutError(
            f"{p} is corrupt ({e.__class__.__name__}: {e}); restore it or re-run the step that "
            "wrote it"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TensorcutError(
            f"{p} is not tensorcut checkpoint metadata (missing format={FORMAT!r})"
        )
    info = CheckpointMeta.from_meta(meta, p)  # model, data set, lineage, metrics, history
    _check_layers(info.layers, p)
    return meta, info


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_EDITED = EDITED


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_geometry(name: str, g: Any, p: Path) -> None:
    """Refuse a recorded convolution geometry that no ``nn.Conv2d`` could have (hand edits)."""
    if not isinstance(g, dict):
        return  # from_config reports a missing or malformed geometry

    def positive(v: Any) -> bool:
        vals = v if isinstance(v, list) else [v]
        return 1 <= len(vals) <= 2 and all(_is_int(x) and x > 0 for x in vals)

    where = f"{p}: layer {name!r}"
    mode = g.get("padding_mode", "zeros")
    if mode not in PADDING_MODES:
        raise TensorcutError(
            f"{where} has unknown padding_mode {mode!r}; choose one of {', '.join(PADDING_MODES)} "
            f"({_EDITED})"
        )
    for key in ("stride", "dilation", "kernel_size"):
        if key in g and not positive(g[key]):
            raise TensorcutError(
                f"{where} has {key} {g[key]!r}; it must be a positive integer or a pair of them "
                f"({_EDITED})"
            )
    for key in ("in_channels", "out_channels", "groups"):
        if key in g and not (_is_int(g[key]) and g[key] > 0):
            raise TensorcutError(
                f"{where} has {key} {g[key]!r}; it must be a positive integer ({_EDITED})"
            )
    pad = g.get("padding", 0)
    pads = pad if isinstance(pad, list) else [pad]
    if not (
        pad in ("same", "valid", "tf_same")
        or (1 <= len(pads) <= 2 and all(_is_int(x) and x >= 0 for x in pads))
    ):
        raise TensorcutError(
            f"{where} has padding {pad!r}; it must be a non-negative integer, a pair of them, "
            f"'same' or 'valid' ({_EDITED})"
        )


def _check_layers(layers: Any, p: Path) -> None:
    """Check the recorded geometry of every factorized layer once, before anything is built: a
    hand-edited value gets one line here instead of a traceback (or silent use) much later."""
    if isinstance(layers, dict):  # a non-object is reported by build_model
        for name, cfg in layers.items():
            if isinstance(cfg, dict):
                _check_geometry(name, cfg.get("geometry"), p)


def _layer_class(method: str | None) -> Any:
    """The registered class that rebuilds a recorded layer (conv methods and ``SVDLinear``)."""
    from tensorcut.layers import layer_class

    return layer_class(method) if method else None


def build_model(meta: dict[str, Any] | CheckpointMeta, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the (uninitialised) architecture described by ``meta``; with ``model`` (a fresh
    instance of the user's architecture), re-apply the recorded factorized layers to it instead."""
    from tensorcut import models
    from tensorcut.layers.base import LAYER_REGISTRY

    info = meta if isinstance(meta, CheckpointMeta) else CheckpointMeta.from_meta(meta)
    spec = info.model
    layers = info.layers or {}
    if not isinstance(layers, dict):
        raise TensorcutError(
            "meta.json 'layers' must map layer names to configurations; the file was edited or is "
            "foreign"
        )
    name = spec.name
    if model is None and name not in models.list_models():
        raise TensorcutError(
            f"checkpoint of model {name!r}, which is not in tensorcut's model registry: pass a "
            f"fresh instance of the architecture, tensorcut.load(path, model={name}(...)), or "
            "register a builder with tensorcut.models.register_model first"
        )
    try:
        if model is None:
            model = spec.create()
    except TypeError as e:
        raise TensorcutError(
            f"meta.json model.kwargs do not fit model {spec.name!r}: {e}"
        ) from None
    except (RuntimeError, MemoryError) as e:  # e.g. a hand-edited width asking for terabytes
        raise TensorcutError(
            f"meta.json describes a model that cannot be built here ({_first_line(e)}); "
            "it disagrees with the weights or was edited"
        ) from None
    aliases = {}
    for name, cfg in layers.items():
        if isinstance(cfg, dict) and set(cfg) == {"alias_of"}:
            aliases[name] = cfg["alias_of"]
            continue
        method = cfg.get("method") if isinstance(cfg, dict) else None
        method = method if isinstance(method, str) else None
        cls = _layer_class(method)
        if cls is None:
            raise TensorcutError(
                f"meta.json layer {name!r} has unknown method {method!r}; known: "
                f"{', '.join(sorted(LAYER_REGISTRY))}"
            )
        try:
            model.get_submodule(name)
        except AttributeError:
            raise TensorcutError(
                f"meta.json names layer {name!r}, which model {spec.name!r} does not "
                "have; the checkpoint is of another architecture"
            ) from None
        try:
            layer = cls.from_config(cfg)
        except (KeyError, TypeError, ValueError, TensorcutError) as e:
            raise TensorcutError(
                f"meta.json layer {name!r} has an invalid configuration: {e}"
            ) from None
        except (RuntimeError, MemoryError) as e:
            raise TensorcutError(
                f"meta.json layer {name!r} cannot be built here ({_first_line(e)}); "
                "its ranks disagree with the weights or were edited"
            ) from None
        model.set_submodule(name, layer)
    for name, target in aliases.items():
        try:
            model.set_submodule(name, model.get_submodule(target))
        except AttributeError:
            raise TensorcutError(
                f"meta.json names layer {name!r} as a second name of {target!r}, which the model "
                "does not have"
            ) from None
    return model


def _header_numel(wpath: Path) -> int | None:
    """Number of stored values according to a safetensors header (None when it cannot be read)."""
    import math
    import struct

    try:
        with open(wpath, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100 << 20:
                return None
            header = json.loads(f.read(n))
        return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError):
        return None


def _check_size(info: CheckpointMeta, wpath: Path) -> None:
    """Refuse, before allocating anything, a meta.json that describes far more weights than the file
    holds.

    The dense architecture is built on the 'meta' device (no memory); the layers it keeps dense
    are a lower bound on what ``model.safetensors`` must contain. A hand-edited width would
    otherwise allocate (and zero) gigabytes before the exact shape check could speak; smaller
    disagreements are left to that check, whose message is more precise.
    """

    stored = _header_numel(wpath)
    if stored is None:
        return
    replaced = tuple(info.layers) if isinstance(info.layers, dict) else ()
    try:
        with torch.device("meta"):
            probe = info.model.create()
        state = probe.state_dict()
    except (TypeError, ValueError, RuntimeError, TensorcutError):
        return  # build_model reports these
    need = sum(
        t.numel()
        for k, t in state.items()
        if not any(k == r or k.startswith(r + ".") for r in replaced)
    )
    if need > stored + (
        1 << 28
    ):  # > 1 GiB of float32 more than stored: refuse before allocating it
        raise TensorcutError(
            f"{wpath.parent}: meta.json describes a model with at least {need:,} weights but "
            f"{WEIGHTS} holds {stored:,}; the files come from different models or meta.json was "
            "edited"
        )


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def _ensure_layers_imported() -> None:
    import tensorcut.layers  # noqa: F401  (registers every layer class)


def load_checkpoint(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    model: nn.Module | None = None,
) -> Checkpoint:
    """Rebuild the model in ``directory`` and load its weights, checking they match ``meta.json``.

    ``model``: a fresh instance of the saved architecture, needed when it is not in tensorcut's
    registry (a timm / torchvision network or your own class); its recorded factorized layers are
    re-applied to it and the weights loaded into it.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    directory = Path(directory)
    meta, info = _read(directory)
    _ensure_layers_imported()
    wpath = directory / WEIGHTS
    if model is None:
        _check_size(info, wpath)
    model = build_model(info, model)
    try:
        state = st_load(wpath.read_bytes())
    except FileNotFoundError:
        raise TensorcutError(
            f"{directory} has no {WEIGHTS}; the checkpoint is incomplete"
        ) from None
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise TensorcutError(
            f"{wpath} is truncated or corrupt ({str(e).splitlines()[0][:120]}); restore it or "
            "re-run the step that wrote it"
        ) from None
    nonfinite = [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]
    if nonfinite:
        raise TensorcutError(
            f"{wpath}: {len(nonfinite)} tensor(s) hold NaN or Inf values (e.g. {nonfinite[0]}); "
            "the run that wrote it diverged or the file is corrupt — retrain or restore it"
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    wrong_type = [
        k
        for k in expected
        if k in state and expected[k].is_floating_point() and not state[k].is_floating_point()
    ]
    if wrong_type:
        k = wrong_type[0]
        raise TensorcutError(
            f"{wpath}: {len(wrong_type)} tensor(s) hold {state[k].dtype} values where the model "
            f"has floating-point weights (e.g. {k}); the file was not written by tensorcut or was "
            "edited"
        )
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad:
            k = bad[0]
            parts.append(
                f"{len(bad)} of wrong shape (e.g. {k}: {tuple(state[k].shape)} vs "
                f"{tuple(expected[k].shape)})"
            )
        raise TensorcutError(
            f"{directory}: weights do not match meta.json ({'; '.join(parts)}); the files come "
            "from different models"
        )
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    model.eval()
    return Checkpoint(model=model, meta=meta)


def load(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    model: nn.Module | None = None,
) -> nn.Module:
    """Rebuild and return the model saved in ``directory`` (in eval mode).

    Args:
        directory: a checkpoint folder (``model.safetensors`` + ``meta.json``).
        map_location: device to put the model on.
        model: a fresh instance of the saved architecture when it is not in tensorcut's
            registry (timm / torchvision networks, your own classes); otherwise omit it.

    Returns:
        The model with its factorized layers and weights, in eval mode.

    Raises:
        TensorcutError: the folder is not a complete tensorcut checkpoint, its files disagree, or
            the architecture is not registered and no ``model`` was given (the message says so).

    Example:
        >>> net = tensorcut.load("runs/r20-tucker2")                      # a zoo model
        >>> net = tensorcut.load("runs/mine-tucker2", model=MyNet())     # your own architecture
    """
    return load_checkpoint(directory, map_location, model=model).model
