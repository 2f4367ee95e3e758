from .loop import Trainer, run_from_config
from .metrics import Metrics

__all__ = ["Trainer", "run_from_config", "Metrics"]
