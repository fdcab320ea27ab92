"""PACED: distillation weighted towards the frontier of the student's competence. See [`PacedTrainer`]."""

from ...instructions import (
    ANSWER_PROMPT_TEMPLATE,
    SOLUTION_PROMPT_TEMPLATE,
    add_privileged_context,
    privileged_context_setup,
)
from ...pass_rates import INDEX_COLUMN, PASS_RATE_FILE, PassRateTable, ema_update, pass_rates_from_rewards
from .callbacks import PassRateCallback
from .paced_config import (
    KL_SCHEDULES,
    PACED_SAMPLING_MODES,
    PASS_RATE_MODES,
    ROLLOUT_SOURCES,
    TEACHER_COMPLETION_SOURCES,
    PacedConfig,
)
from .paced_trainer import PacedTrainer
from .paced_utils import completion_ids_until_eos, paced_phase, schedule_switch_step


__all__ = [
    "ANSWER_PROMPT_TEMPLATE",
    "INDEX_COLUMN",
    "KL_SCHEDULES",
    "PACED_SAMPLING_MODES",
    "PASS_RATE_FILE",
    "PASS_RATE_MODES",
    "ROLLOUT_SOURCES",
    "SOLUTION_PROMPT_TEMPLATE",
    "TEACHER_COMPLETION_SOURCES",
    "PacedConfig",
    "PacedTrainer",
    "PassRateCallback",
    "PassRateTable",
    "add_privileged_context",
    "completion_ids_until_eos",
    "ema_update",
    "paced_phase",
    "pass_rates_from_rewards",
    "privileged_context_setup",
    "schedule_switch_step",
]
