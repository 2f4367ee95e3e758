from .herding import herding, random_selection
from .memory import ExemplarMemory
from .nme import class_mean, nme_predict

__all__ = ["herding", "random_selection", "ExemplarMemory", "class_mean", "nme_predict"]
