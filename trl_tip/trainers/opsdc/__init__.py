"""OPSDC (CRISP): on-policy self-distillation for concise reasoning. See [`OPSDCTrainer`]."""

from .opsdc_config import LOSS_NORMALIZATIONS, OPSDCConfig
from .opsdc_trainer import OPSDCTrainer
from .teacher_snapshot import (
    OPSDC_STATE_NAME,
    TEACHER_ADAPTER_NAME,
    TEACHER_SNAPSHOT_NAME,
    _AdapterSnapshot,
    adapter_snapshot_pairs,
    copy_snapshot_,
    module_snapshot_pairs,
)


__all__ = [
    "LOSS_NORMALIZATIONS",
    "OPSDC_STATE_NAME",
    "OPSDCConfig",
    "OPSDCTrainer",
    "TEACHER_ADAPTER_NAME",
    "TEACHER_SNAPSHOT_NAME",
    "adapter_snapshot_pairs",
    "copy_snapshot_",
    "module_snapshot_pairs",
]
