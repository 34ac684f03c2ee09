"""Pure tensor decompositions on torch tensors (no nn.Module)."""
