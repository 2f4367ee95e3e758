from .protocol import Phases, class_order, exemplars_per_class
from .sources import Dataset, DatasetError, Split, load_dataset

__all__ = ["class_order", "Phases", "exemplars_per_class", "Dataset", "DatasetError", "Split", "load_dataset"]
