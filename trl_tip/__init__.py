"""trl_tip: TRL trainers for cheaper, better post-training of language models."""

__version__ = "0.1.0"

from .rewards import extract_answer, grade_answer, math_reward
from .selection import SELECTION_METHODS, select_tokens
from .losses import selective_divergence_loss
from .token_stats import TokenStats, token_stats
from .trainers import TipDistillConfig, TipDistillTrainer
from .trainers import PacedConfig, PacedTrainer, PassRateTable
from .weighting import paced_weight


__all__ = [
    "PacedConfig",
    "PacedTrainer",
    "PassRateTable",
    "SELECTION_METHODS",
    "TipDistillConfig",
    "TipDistillTrainer",
    "TokenStats",
    "extract_answer",
    "grade_answer",
    "math_reward",
    "paced_weight",
    "select_tokens",
    "selective_divergence_loss",
    "token_stats",
]
