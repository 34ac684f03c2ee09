"""Factorized layers: nn.Modules built from decomposed kernels."""
