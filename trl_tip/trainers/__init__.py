"""trl_tip's trainers: one module per trainer, each a config dataclass and a subclass of a TRL trainer."""

from .ace_grpo import ACEGRPOConfig, ACEGRPOTrainer


__all__ = ["ACEGRPOConfig", "ACEGRPOTrainer"]
