"""FashionNet: a two-layer CNN for Fashion-MNIST, and what trains and evaluates it."""

from fashionnet.data import CLASSES
from fashionnet.model import FashionNet

__all__ = ["CLASSES", "FashionNet"]
