"""
trl_tip's trainers, each a config dataclass and a subclass of a TRL trainer: one module (`ace_grpo`), or one package
laid out like TRL's experimental trainers (`tip_distill`, `opsdc`, `paced`: config, trainer, and the pieces the trainer
wires in, each in its own module).
"""

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
