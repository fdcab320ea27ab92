"""trl_tip's trainers: one module per trainer, each a config dataclass and a subclass of a TRL trainer."""

from ..pass_rates import PassRateTable
from .ace_grpo import ACEGRPOConfig, ACEGRPOTrainer
from .opsdc import OPSDCConfig, OPSDCTrainer
from .paced import PacedConfig, PacedTrainer
from .tip_distill import TipDistillConfig, TipDistillTrainer


__all__ = [
    "ACEGRPOConfig",
    "ACEGRPOTrainer",
    "OPSDCConfig",
    "OPSDCTrainer",
    "PacedConfig",
    "PacedTrainer",
    "PassRateTable",
    "TipDistillConfig",
    "TipDistillTrainer",
]
