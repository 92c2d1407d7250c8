"""FashionNet: a two-layer CNN for Fashion-MNIST, and what trains, evaluates and applies it."""

from fashionnet.data import CLASSES
from fashionnet.model import FashionNet
from fashionnet.prediction import Predictions, predict

__all__ = ["CLASSES", "FashionNet", "Predictions", "predict"]
