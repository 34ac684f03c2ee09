"""tensorcut: tensor-network compression of convolutional networks."""

__version__ = "0.1.0"
__all__ = ["__version__"]
