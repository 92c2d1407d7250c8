"""FashionNet: a two-layer CNN for Fashion-MNIST, and what trains and evaluates it."""

from fashionnet.model import CLASSES, FashionNet

__all__ = ["CLASSES", "FashionNet"]
