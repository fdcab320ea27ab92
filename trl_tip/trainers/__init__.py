"""One module per trainer: its config dataclass and its trainer class."""

from .paced import PacedConfig, PacedTrainer, PassRateTable
from .tip_distill import TipDistillConfig, TipDistillTrainer


__all__ = ["PacedConfig", "PacedTrainer", "PassRateTable", "TipDistillConfig", "TipDistillTrainer"]
