"""trl_tip's trainers: one module per trainer, each a config dataclass and a subclass of a TRL trainer."""

from .opsdc import OPSDCConfig, OPSDCTrainer


__all__ = ["OPSDCConfig", "OPSDCTrainer"]
