"""trl_tip: TRL trainers for cheaper, better post-training of language models.

The trainers and the chunked kernels are imported on first use, so `import trl_tip` (and `trl_tip.tiny_models`) stays
light: it does not import TRL's trainer stack until a trainer, config or kernel is asked for.
"""

import importlib

from . import _notices  # noqa: F401 (first: filters a third-party import-time notice, see there)
from .instructions import CONCISE_INSTRUCTIONS, build_teacher_prompt, resolve_instruction
from .rewards import extract_answer, grade_answer, math_reward
from .selection import SELECTION_METHODS, select_tokens
from .weighting import ace_confidence_shift, ace_scale_advantages, paced_weight


__version__ = "0.1.0"

# Public name -> submodule that defines it, imported on first access.
_LAZY = {
    "ACEGRPOConfig": "trl_tip.trainers.ace_grpo",
    "ACEGRPOTrainer": "trl_tip.trainers.ace_grpo",
    "evaluate_pass_at_k": "trl_tip.evaluation",
    "pass_at_k": "trl_tip.evaluation",
    "OPSDCConfig": "trl_tip.trainers.opsdc",
    "OPSDCTrainer": "trl_tip.trainers.opsdc",
    "PacedConfig": "trl_tip.trainers.paced",
    "PassAtKCallback": "trl_tip.eval_callback",
    "PacedTrainer": "trl_tip.trainers.paced",
    "PassRateTable": "trl_tip.pass_rates",
    "TipDistillConfig": "trl_tip.trainers.tip_distill",
    "TipDistillTrainer": "trl_tip.trainers.tip_distill",
    "TokenStats": "trl_tip.chunked_stats",
    "token_stats": "trl_tip.chunked_stats",
    "selective_divergence_loss": "trl_tip.losses",
    "selective_sparse_divergence_loss": "trl_tip.served_loss",
    "ServedTeacherLogprobs": "trl_tip.served_loss",
}

__all__ = [
    "CONCISE_INSTRUCTIONS",
    "SELECTION_METHODS",
    "ace_confidence_shift",
    "ace_scale_advantages",
    "build_teacher_prompt",
    "extract_answer",
    "grade_answer",
    "math_reward",
    "paced_weight",
    "resolve_instruction",
    "select_tokens",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trl_tip' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
