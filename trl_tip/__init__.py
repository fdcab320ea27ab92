"""trl_tip: TRL trainers for cheaper, better post-training of language models."""

__version__ = "0.1.0"

from .instructions import CONCISE_INSTRUCTIONS, add_instruction, resolve_instruction
from .rewards import extract_answer, grade_answer, math_reward
from .trainers import OPSDCConfig, OPSDCTrainer


__all__ = ["extract_answer", "grade_answer", "math_reward"]
__all__ += ["CONCISE_INSTRUCTIONS", "OPSDCConfig", "OPSDCTrainer", "add_instruction", "resolve_instruction"]
