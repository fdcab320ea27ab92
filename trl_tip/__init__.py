"""trl_tip: TRL trainers for cheaper, better post-training of language models."""

__version__ = "0.1.0"

from .evaluation import evaluate_pass_at_k, pass_at_k
from .rewards import extract_answer, grade_answer, math_reward
from .trainers import ACEGRPOConfig, ACEGRPOTrainer
from .weighting import ace_confidence_shift, ace_scale_advantages


__all__ = ["extract_answer", "grade_answer", "math_reward"]
__all__ += ["ACEGRPOConfig", "ACEGRPOTrainer", "ace_confidence_shift", "ace_scale_advantages"]
__all__ += ["evaluate_pass_at_k", "pass_at_k"]
