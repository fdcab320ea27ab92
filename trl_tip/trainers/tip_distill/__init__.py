"""TIP: on-policy distillation that trains only on the tokens that matter. See [`TipDistillTrainer`]."""

from .tip_distill_config import TEACHER_QUANTIZATION, TipDistillConfig, teacher_quantization_config
from .tip_distill_trainer import SELECTION_RNG_FILE, TipDistillTrainer


__all__ = [
    "SELECTION_RNG_FILE",
    "TEACHER_QUANTIZATION",
    "TipDistillConfig",
    "TipDistillTrainer",
    "teacher_quantization_config",
]
