"""One module per trainer: its config dataclass and its trainer class."""

from .tip_distill import TipDistillConfig, TipDistillTrainer


__all__ = ["TipDistillConfig", "TipDistillTrainer"]
