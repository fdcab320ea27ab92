"""PACED: distillation weighted towards the frontier of the student's competence.

Each training problem `i` gets the weight `w_i = p_i^α (1 − p_i)^β` from the student's pass rate `p_i` (estimated from
`K` graded student rollouts), and a batch's loss is `Σ_i w_i ℓ_i / Σ_i w_i` with `ℓ_i` the token-mean divergence of
problem `i`'s completion. Problems the student always or never solves weigh nothing; the ones it sometimes solves carry
the update.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset
from trl.data_utils import is_conversational
from trl.models.utils import unwrap_model_for_generation
from transformers.optimization import GreedyLR
from trl.trainer.utils import get_config_model_id, pad

from ..pass_rates import (  # noqa: F401 (ema_update, pass_rates_from_rewards: importable from here as before)
    INDEX_COLUMN,
    PASS_RATE_FILE,
    PassRateTable,
    ProblemSampler,
    _PassRateCallback,
    ema_update,
    estimate_pass_rates,
    load_pass_rate_table,
    pass_rates_from_rewards,
    save_pass_rate_table,
)
from ..rewards import math_reward
from ..selection import SELECTION_METHODS
from ._inputs import check_completion_format, check_prompt_column, check_reward_columns, check_train_rows
from ._teacher_prompts import pad_teacher_prompts
from .tip_distill import TipDistillConfig, TipDistillTrainer


logger = get_logger(__name__)

PASS_RATE_MODES = ("once", "refresh", "online")
PACED_SAMPLING_MODES = ("weight", "sample")
ROLLOUT_SOURCES = ("student", "teacher")
KL_SCHEDULES = ("reverse", "forward", "forward_then_reverse")
TEACHER_COMPLETION_SOURCES = ("auto", "dataset", "generate")
# Names under which `reward_funcs` may name the built-in verifiable math reward.
BUILTIN_REWARDS = {"math": math_reward, "math_reward": math_reward}


@dataclass
class PacedConfig(TipDistillConfig):
    r"""
    Configuration class for the [`PacedTrainer`].

    Extends [`TipDistillConfig`] (so TIP's token selection composes with PACED's problem weighting) with the parameters
    of PACED. Each problem is weighted by `p^α (1 − p)^β`, `p` being the student's pass rate on it.

    Parameters:
        > Problem weighting

        paced_alpha (`float`, *optional*, defaults to `1.0`):
            Exponent α ≥ 0 of the pass rate `p` in the weight.
        paced_beta (`float`, *optional*, defaults to `1.0`):
            Exponent β ≥ 0 of `1 − p` in the weight. `paced_alpha = paced_beta = 0` weighs every problem equally.
        paced_sampling (`str`, *optional*, defaults to `"weight"`):
            How the weight enters training. `"weight"`: problems are drawn as TRL draws them and each rollout's loss
            is weighted, `Σ_i w_i ℓ_i / Σ_i w_i`. `"sample"`: each generation batch's problems are drawn i.i.d. with
            probability `w_i / Σ_j w_j` from the whole table (as it is at that step), and the loss is the plain mean
            `(1/n) Σ_i ℓ_i`: the same objective in expectation, but problems of weight 0 (`p` = 0, 1 or unknown) are
            never rolled out, so a smaller batch carries the same signal.

        > Pass-rate estimation

        pass_rate_rollouts (`int`, *optional*, defaults to `8`):
            K: student rollouts per problem, graded by the reward functions, from which a pass rate is estimated.
        pass_rate_mode (`str`, *optional*, defaults to `"once"`):
            `"once"`: estimated before training with the initial student and kept fixed. `"refresh"`: re-estimated with
            the current student every `pass_rate_refresh_steps` optimiser steps. `"online"`: estimated once, then
            updated from the student rollouts training draws, as an exponential moving average with rate
            `pass_rate_ema`.
        pass_rate_refresh_steps (`int` or `None`, *optional*, defaults to `None`):
            Optimiser steps between two re-estimations; required by, and only used with, `pass_rate_mode="refresh"`.
        pass_rate_ema (`float`, *optional*, defaults to `0.1`):
            Weight of a new observation in the online moving average, in (0, 1] (`pass_rate_mode="online"`).
        pass_rate_batch_size (`int` or `None`, *optional*, defaults to `None`):
            Problems per process per generation call of the estimation (each gives K rollouts). Defaults to
            `per_device_train_batch_size × gradient_accumulation_steps`.

        > Tracks and schedule

        rollout_source (`str`, *optional*, defaults to `"student"`):
            Who writes the completions trained on: `"student"` (on-policy rollouts) or `"teacher"` (off-policy: the
            teacher's completions, on which the student is scored; the forward-KL track of PACED).
        teacher_completions (`str`, *optional*, defaults to `"auto"`):
            Where teacher completions come from: `"dataset"` (the dataset's `completion` column, e.g. reference
            solutions), `"generate"` (sampled from the teacher with transformers' `generate`, same sampling settings
            as the student), or `"auto"` (`"dataset"` when the column exists, else `"generate"`).
        kl_schedule (`str` or `None`, *optional*, defaults to `None`):
            `None`: TRL's `beta` throughout (`1.0`, its default, is reverse KL; `0.0` forward KL; in between the
            generalised JSD). `"reverse"`: reverse KL throughout (`beta=1`). `"forward"`: forward KL throughout
            (`beta=0`). `"forward_then_reverse"`: forward KL on teacher completions, then, from the switch step on,
            reverse KL on student rollouts. A schedule sets `beta`, which must then be left at its default.
        schedule_switch_fraction (`float`, *optional*, defaults to `0.5`):
            Fraction of the training steps after which `"forward_then_reverse"` switches: the switch step is
            `⌊fraction × max_steps⌋`.
        self_distillation (`bool`, *optional*, defaults to `False`):
            Use a frozen copy of the initial student as the teacher, reading the problem with privileged context: the
            reference solution where the dataset has one, else the ground-truth answer (`privileged_context_column`,
            `privileged_prompt_template`); no teacher model is given.
        privileged_context_column (`str` or `None`, *optional*, defaults to `None`):
            Column the self-distillation teacher reads as privileged context. `None`: `solution` (a reference
            solution) when the dataset has that column, else `answer`.
        privileged_prompt_template (`str` or `None`, *optional*, defaults to `None`):
            The self-distillation teacher's version of the last user turn, with `{problem}` (the original text) and
            `{context}` (the privileged context; `{answer}` is accepted for it too). `None`: the OPSD authors' layout
            for a reference solution (`"## Problem\n{problem}\n\n## Reference Solution\n{context}\n\nAfter
            understanding the reference solution, solve the problem step by step using your own approach."`), or
            `"{problem}\n\nThe correct final answer is {context}."` when the context is the `answer` column.

    > [!NOTE]
    > `token_selection` defaults to `"all"` here (plain PACED); any TIP rule can be combined with the weighting. `beta`
    > means what it means in TRL unless a `kl_schedule` is given, which sets it.
    """

    token_selection: str = field(
        default="all",
        metadata={
            "help": "Which completion tokens the loss is computed on (TIP rules): 'all' (plain PACED), 'random', "
            "'entropy_sample', 'entropy_topk', 'divergence_topk', 'soft_or' or 'overconfident'.",
            "choices": list(SELECTION_METHODS),
        },
    )
    paced_alpha: float = field(
        default=1.0,
        metadata={"help": "Exponent alpha >= 0 of the pass rate p in the problem weight p^alpha (1-p)^beta."},
    )
    paced_beta: float = field(
        default=1.0,
        metadata={"help": "Exponent beta >= 0 of (1-p) in the problem weight; alpha = beta = 0 weighs all equally."},
    )
    paced_sampling: str = field(
        default="weight",
        metadata={
            "help": "'weight' (weight each rollout's loss by w(p)) or 'sample' (draw problems with probability "
            "proportional to w(p) and take the plain mean; weight-0 problems are never rolled out).",
            "choices": list(PACED_SAMPLING_MODES),
        },
    )
    pass_rate_rollouts: int = field(
        default=8, metadata={"help": "K: graded student rollouts per problem from which its pass rate is estimated."}
    )
    pass_rate_mode: str = field(
        default="once",
        metadata={
            "help": "'once' (estimated before training, fixed), 'refresh' (re-estimated every "
            "pass_rate_refresh_steps) or 'online' (then updated from training's own student rollouts, as a moving "
            "average).",
            "choices": list(PASS_RATE_MODES),
        },
    )
    pass_rate_refresh_steps: int | None = field(
        default=None,
        metadata={"help": "Optimiser steps between re-estimations; required by pass_rate_mode='refresh' only."},
    )
    pass_rate_ema: float = field(
        default=0.1,
        metadata={"help": "Weight of a new observation in the online moving average of pass rates, in (0, 1]."},
    )
    pass_rate_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Problems per process per generation call when estimating pass rates (each gives K rollouts). "
            "Defaults to per_device_train_batch_size * gradient_accumulation_steps."
        },
    )
    rollout_source: str = field(
        default="student",
        metadata={
            "help": "Who writes the completions trained on: 'student' (on-policy) or 'teacher' (off-policy teacher "
            "completions, the forward-KL track).",
            "choices": list(ROLLOUT_SOURCES),
        },
    )
    teacher_completions: str = field(
        default="auto",
        metadata={
            "help": "Source of teacher completions: 'dataset' (the `completion` column), 'generate' (sampled from the "
            "teacher) or 'auto' ('dataset' when the column exists).",
            "choices": list(TEACHER_COMPLETION_SOURCES),
        },
    )
    kl_schedule: str | None = field(
        default=None,
        metadata={
            "help": "None (TRL's beta throughout: 1.0 reverse KL, 0.0 forward KL), 'reverse' (reverse KL throughout), "
            "'forward' (forward KL throughout) or 'forward_then_reverse' (forward KL on teacher completions, then "
            "reverse KL on student rollouts). A schedule sets beta.",
            "choices": list(KL_SCHEDULES),
        },
    )
    schedule_switch_fraction: float = field(
        default=0.5,
        metadata={"help": "Fraction of max_steps after which 'forward_then_reverse' switches, in (0, 1)."},
    )
    self_distillation: bool = field(
        default=False,
        metadata={
            "help": "Teacher = frozen copy of the initial student that reads privileged context in its prompt: the "
            "reference solution when the dataset has one, else the ground-truth answer (privileged_context_column)."
        },
    )
    privileged_context_column: str | None = field(
        default=None,
        metadata={
            "help": "Column the self-distillation teacher reads as privileged context. None: 'solution' (a "
            "reference solution) when the dataset has it, else 'answer'."
        },
    )
    privileged_prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "The self-distillation teacher's last user turn, with placeholders {problem} and {context} (or "
            "{answer}). None: a reference-solution layout for a solution column, 'The correct final answer is ...' "
            "for the answer column."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.paced_alpha < 0 or self.paced_beta < 0:
            raise ValueError(
                f"paced_alpha and paced_beta must be >= 0, got {self.paced_alpha} and {self.paced_beta}. The weight "
                "p^alpha (1-p)^beta peaks at p = alpha / (alpha + beta)."
            )
        if self.paced_sampling not in PACED_SAMPLING_MODES:
            raise ValueError(
                f"paced_sampling must be one of {', '.join(PACED_SAMPLING_MODES)}, got {self.paced_sampling!r}."
            )
        if self.pass_rate_rollouts < 1:
            raise ValueError(f"pass_rate_rollouts must be >= 1, got {self.pass_rate_rollouts}.")
        if self.pass_rate_mode not in PASS_RATE_MODES:
            raise ValueError(
                f"pass_rate_mode must be one of {', '.join(PASS_RATE_MODES)}, got {self.pass_rate_mode!r}."
            )
        if self.pass_rate_mode == "refresh":
            if self.pass_rate_refresh_steps is None or self.pass_rate_refresh_steps < 1:
                raise ValueError(
                    "pass_rate_mode='refresh' needs pass_rate_refresh_steps >= 1 (optimiser steps between "
                    f"re-estimations), got {self.pass_rate_refresh_steps}."
                )
        elif self.pass_rate_refresh_steps is not None:
            raise ValueError(
                f"pass_rate_refresh_steps is only used with pass_rate_mode='refresh', but pass_rate_mode is "
                f"{self.pass_rate_mode!r}; unset it or set pass_rate_mode='refresh'."
            )
        if not 0.0 < self.pass_rate_ema <= 1.0:
            raise ValueError(f"pass_rate_ema must be in (0, 1], got {self.pass_rate_ema}.")
        if self.pass_rate_batch_size is not None and self.pass_rate_batch_size < 1:
            raise ValueError(f"pass_rate_batch_size must be >= 1 or None, got {self.pass_rate_batch_size}.")
        if self.rollout_source not in ROLLOUT_SOURCES:
            raise ValueError(
                f"rollout_source must be one of {', '.join(ROLLOUT_SOURCES)}, got {self.rollout_source!r}."
            )
        if self.teacher_completions not in TEACHER_COMPLETION_SOURCES:
            raise ValueError(
                f"teacher_completions must be one of {', '.join(TEACHER_COMPLETION_SOURCES)}, got "
                f"{self.teacher_completions!r}."
            )
        if self.kl_schedule is not None and self.kl_schedule not in KL_SCHEDULES:
            raise ValueError(
                f"kl_schedule must be None or one of {', '.join(KL_SCHEDULES)}, got {self.kl_schedule!r}."
            )
        if not 0.0 < self.schedule_switch_fraction < 1.0:
            raise ValueError(f"schedule_switch_fraction must be in (0, 1), got {self.schedule_switch_fraction}.")
        # Without a schedule `beta` is TRL's; a schedule sets it (1.0 is DistillationConfig's default).
        if self.kl_schedule == "forward" and self.beta in (0.0, 1.0):
            self.beta = 0.0
        elif self.kl_schedule is not None and self.beta != 1.0:
            raise ValueError(
                f"beta={self.beta} conflicts with kl_schedule={self.kl_schedule!r}, which sets the divergence itself "
                "('reverse': beta=1, 'forward': beta=0, 'forward_then_reverse': 0 then 1). Leave kl_schedule unset to "
                f"train with TRL's beta={self.beta} throughout, or leave beta at its default."
            )
        if self.kl_schedule == "forward_then_reverse" and self.rollout_source != "student":
            raise ValueError(
                "kl_schedule='forward_then_reverse' trains on teacher completions before the switch and on student "
                "rollouts after it, so rollout_source must stay 'student'."
            )
        if self.pass_rate_mode == "online" and self.rollout_source == "teacher":
            raise ValueError(
                "pass_rate_mode='online' updates pass rates from the student rollouts training draws, but "
                "rollout_source='teacher' draws none. Use pass_rate_mode='once' or 'refresh'."
            )
        if self.self_distillation and self.teacher_model_name_or_path is not None:
            raise ValueError(
                "self_distillation=True uses a frozen copy of the student as the teacher; unset "
                f"teacher_model_name_or_path (got {self.teacher_model_name_or_path!r})."
            )
        if self.privileged_prompt_template is not None:
            try:
                rendered = self.privileged_prompt_template.format(
                    problem="\0problem\0", context="\0context\0", answer="\0context\0"
                )
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(
                    "privileged_prompt_template may only use the placeholders {problem} and {context} (or {answer}; "
                    f"double other braces): {error!r} in {self.privileged_prompt_template!r}."
                ) from None
            if "\0problem\0" not in rendered or "\0context\0" not in rendered:
                raise ValueError(
                    "privileged_prompt_template must contain both {problem} and {context} (or {answer}), got "
                    f"{self.privileged_prompt_template!r}."
                )
        if self.privileged_context_column is not None and not self.self_distillation:
            raise ValueError(
                "privileged_context_column names what the self-distillation teacher reads; it needs "
                "self_distillation=True."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------------


def schedule_switch_step(max_steps: int, fraction: float) -> int:
    """The first optimiser step of the reverse-KL phase of `"forward_then_reverse"`: `⌊fraction × max_steps⌋`."""
    return math.floor(fraction * max_steps)


def paced_phase(
    step: int,
    max_steps: int,
    kl_schedule: str | None,
    switch_fraction: float,
    rollout_source: str,
    beta: float = 1.0,
) -> tuple:
    """
    Divergence and rollout source at optimiser step `step` (0-based); `beta` is the configured one, used throughout
    when `kl_schedule` is `None`.

    Returns:
        `tuple[float, str]`: TRL's `beta` (`0.0` forward KL, `1.0` reverse KL) and `"student"` or `"teacher"`.
    """
    if kl_schedule is None:
        return beta, rollout_source
    if kl_schedule == "reverse":
        return 1.0, rollout_source
    if kl_schedule == "forward":
        return 0.0, rollout_source
    if kl_schedule == "forward_then_reverse":
        return (0.0, "teacher") if step < schedule_switch_step(max_steps, switch_fraction) else (1.0, "student")
    raise ValueError(f"kl_schedule must be one of {', '.join(KL_SCHEDULES)}, got {kl_schedule!r}.")


def completion_ids_until_eos(completion_ids: torch.Tensor, eos_token_ids: Sequence[int]) -> list[list[int]]:
    """Each row of `(B, T)` generated ids up to and including its first end-of-sequence token (all of it if none)."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, completion_ids.size(1))
    return [row[:length].tolist() for row, length in zip(completion_ids.cpu(), lengths.cpu().tolist(), strict=True)]


# The privileged prompt of the OPSD authors' teacher, for a reference solution (HJSang/OPSD_OnPolicyDistillation,
# config `opsd_qwen3_teacher`; its dataset-specific answer-format sentence left out), and for a bare final answer.
SOLUTION_PROMPT_TEMPLATE = (
    "## Problem\n{problem}\n\n## Reference Solution\n{context}\n\nAfter understanding the reference solution, solve "
    "the problem step by step using your own approach."
)
ANSWER_PROMPT_TEMPLATE = "{problem}\n\nThe correct final answer is {context}."


def privileged_context_setup(columns: Sequence[str], column: str | None, template: str | None) -> tuple[str, str]:
    """
    The column and the template of the self-distillation teacher's privileged context: the named column (which must
    exist), else `solution` when the dataset has it, else `answer`; the template given, else the reference-solution
    layout or, for the `answer` column, the final-answer one.
    """
    if column is None:
        column = "solution" if "solution" in columns else "answer"
    if column not in columns:
        raise ValueError(
            f"The self-distillation teacher reads the `{column}` column as privileged context, but the dataset has "
            f"columns {list(columns)}. Add a `solution` (reference solution) or `answer` column, or name yours with "
            "privileged_context_column."
        )
    if template is None:
        template = ANSWER_PROMPT_TEMPLATE if column == "answer" else SOLUTION_PROMPT_TEMPLATE
    return column, template


def add_privileged_context(prompt: str | list[dict], context: Any, template: str) -> str | list[dict]:
    """
    The self-distillation teacher's prompt: the last user turn (or a plain-text prompt) rewritten with `template`,
    whose `{problem}` is the original text and `{context}` (or `{answer}`) the privileged context, e.g.
    `"{problem}\\n\\nThe correct final answer is {context}."`. The input is not modified.
    """
    if isinstance(prompt, str):
        return template.format(problem=prompt, context=context, answer=context)
    messages = copy.deepcopy(list(prompt))
    for message in reversed(messages):
        if message.get("role") == "user":
            if not isinstance(message.get("content"), str):
                raise ValueError(
                    "Self-distillation adds the privileged context to the last user turn, which must be plain text; "
                    f"got content of type {type(message.get('content')).__name__}."
                )
            message["content"] = template.format(problem=message["content"], context=context, answer=context)
            return messages
    raise ValueError(
        "Self-distillation adds the privileged context to the last user turn, but the prompt has no user message; "
        "give each conversational prompt a user turn holding the problem."
    )


def resolve_reward_funcs(reward_funcs) -> list[Callable]:
    """Reward functions as a list of callables; `"math"` names [`~trl_tip.math_reward`]. Fails clearly otherwise."""
    if reward_funcs is None:
        raise ValueError(
            "PacedTrainer needs `reward_funcs` to grade the student's rollouts into pass rates: pass "
            "trl_tip.math_reward (or 'math') for math answers, or your own TRL-style reward functions."
        )
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise ValueError("`reward_funcs` is empty; PacedTrainer needs at least one reward function to grade rollouts.")
    resolved = []
    for func in funcs:
        if isinstance(func, str):
            if func not in BUILTIN_REWARDS:
                raise ValueError(
                    f"Unknown reward {func!r}: PacedTrainer accepts callables with TRL's reward signature or the name "
                    f"of a built-in reward ({', '.join(BUILTIN_REWARDS)}). Reward models are not supported."
                )
            func = BUILTIN_REWARDS[func]
        elif not callable(func):
            raise TypeError(f"reward_funcs must be callables or built-in reward names, got {type(func).__name__}.")
        resolved.append(func)
    return resolved


def _reward_name(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------------


# Schedulers transformers' `Trainer` steps on evaluation metrics, not after each optimiser step.
_SCHEDULERS_STEPPED_ON_METRICS = (torch.optim.lr_scheduler.ReduceLROnPlateau, GreedyLR)


class _HeldOnSkippedSteps:
    """
    A learning-rate scheduler that stays where it is on the optimiser steps its trainer skips.

    transformers' `Trainer` steps `self.lr_scheduler` after every optimiser step; on a step that [`PacedTrainer`]
    skips, `step` does nothing. Everything else (`get_last_lr`, `state_dict`, `load_state_dict`, ...) is the wrapped
    scheduler's, so checkpoints are the same as without the wrapper.
    """

    def __init__(self, scheduler, step_skipped: Callable[[], bool]):
        self.scheduler = scheduler
        self._step_skipped = step_skipped

    def step(self, *args, **kwargs):
        if not self._step_skipped():
            self.scheduler.step(*args, **kwargs)

    def __getattr__(self, name):
        if name == "scheduler":  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.scheduler, name)


class PacedTrainer(TipDistillTrainer):
    """
    Distillation weighted by the student's pass rate: PACED (distillation at the frontier of student competence).

    Before training, the student writes `K` rollouts for every training problem, the reward functions grade them, and
    each problem gets the weight `w = p^α (1 − p)^β` of its pass rate `p`. Training is TRL's distillation (the
    teacher's full next-token distribution, chunked, never materialising logits) with the batch loss
    `Σ_i w_i ℓ_i / Σ_i w_i`, `ℓ_i` being the token-mean divergence of problem `i`'s completion and `Σ w` taken over
    the whole global batch. A batch in which every weight is zero gives an exact zero loss and zero gradients.

    Tracks (see [`PacedConfig`]): on-policy reverse KL on student rollouts (default); forward KL on teacher-written
    completions (`rollout_source="teacher"`, `kl_schedule="forward"`); both in sequence (`"forward_then_reverse"`); and
    self-distillation (`self_distillation=True`, no teacher: a frozen copy of the student that reads the
    reference solution, or the answer when there is none).
    TIP token selection (`token_selection`) composes: `ℓ_i` is then the mean over the kept tokens.

    The pass-rate table is saved next to every checkpoint (`paced_pass_rates.json`), restored by
    `train(resume_from_checkpoint=...)` and exportable with [`~PacedTrainer.export_pass_rates`]. The evaluation loss is
    the unweighted divergence on student rollouts (pass rates exist for training problems only).

    Args:
        model (`str` or [`~transformers.PreTrainedModel`]): the student, as in [`~trl.DistillationTrainer`].
        teacher_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            The teacher; defaults to `args.teacher_model_name_or_path`. Must be unset with `self_distillation=True`.
        args ([`PacedConfig`], *optional*): configuration.
        train_dataset ([`~datasets.Dataset`]):
            Map-style, text-only dataset with a `prompt` column, an `answer` column (for the built-in math reward and
            self-distillation; every column is passed to reward functions) and, for teacher completions from the
            dataset, a `completion` column. A `paced_index` column is added (the row of each problem in the table).
        reward_funcs (`Callable`, `str` or a list of them):
            TRL-style reward functions `f(prompts, completions, completion_ids, **columns) -> list[float | None]`,
            or `"math"` for [`~trl_tip.math_reward`]. A rollout passes with the sum of its rewards, which must lie in
            `[0, 1]`; a rollout no function grades (all `None`) is left out of its problem's pass rate.
        eval_dataset, processing_class, callbacks, optimizers, quantization_config, peft_config:
            As in [`~trl.DistillationTrainer`]. Tool calling is not supported.

    Logged: `paced/weight_mean`, `paced/weight_max`, `paced/zero_weight_share` (share of the batch's problems with
    weight 0), `paced/zero_weight_batches` (running count of generation batches whose whole batch weighed 0),
    `paced/skipped_steps` (optimiser steps skipped, learning-rate schedule included, because they weighed 0),
    `paced/pass_rate_mean`, `paced/beta`, `paced/teacher_rollouts`, the training set's pass-rate histogram
    `paced/pass_rate_share_{0,0_25,25_50,50_75,75_100,1}`, `paced/table_weight_mean`, `paced/pass_rate_estimates`,
    `paced/training_rollouts` (running count of training rollouts) and, in online mode, `paced/rollout_reward_mean`.

    With `paced_sampling="sample"`, each generation batch's problems are drawn in proportion to their weight from the
    whole table instead (problems of weight 0 are never rolled out), and the loss is their plain mean.

    Example:

    ```python
    >>> from trl_tip import PacedConfig, PacedTrainer, math_reward
    >>> from trl_tip.tasks import prepare_arithmetic_models

    >>> built = prepare_arithmetic_models()
    >>> trainer = PacedTrainer(
    ...     model=built["student"],
    ...     teacher_model=built["teacher"],
    ...     reward_funcs=math_reward,
    ...     args=PacedConfig("paced-out", max_completion_length=32, bf16=False),
    ...     train_dataset=built["dataset"]["train"],
    ... )
    >>> trainer.train()
    >>> trainer.export_pass_rates("pass_rates.jsonl")
    ```
    """

    _tag_names = ["trl", "trl-tip", "distillation", "paced"]
    _name = "PACED distillation"
    _card_fields = (
        "paced_alpha",
        "paced_beta",
        "pass_rate_rollouts",
        "pass_rate_mode",
        "rollout_source",
        "kl_schedule",
        "schedule_switch_fraction",
        "self_distillation",
        "token_selection",
        "token_ratio",
    )
    _paper = {"title": "PACED: Distillation at the Frontier of Student Competence", "id": "2603.11178"}

    def __init__(
        self,
        model,
        teacher_model=None,
        args: PacedConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        *,
        reward_funcs=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = PacedConfig(f"{model_name.split('/')[-1]}-PACED")
        if not isinstance(args, PacedConfig):
            raise TypeError(
                f"PacedTrainer needs a PacedConfig as `args`, got {type(args).__name__}. PacedConfig accepts every "
                "DistillationConfig field."
            )
        self.reward_funcs = resolve_reward_funcs(reward_funcs)
        train_dataset = self._check_train_dataset(train_dataset, args)
        if args.self_distillation and eval_dataset is not None:
            named = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval_dataset", eval_dataset)]
            for name, dataset in named:
                columns = getattr(dataset, "column_names", None)
                if columns is not None and self._privileged_column not in columns:
                    raise ValueError(
                        f"`{name}` has no `{self._privileged_column}` column, which the self-distillation teacher "
                        "reads in its prompt during evaluation too."
                    )
        teacher_model = self._resolve_teacher(model, teacher_model, args)

        super().__init__(
            model=model,
            teacher_model=teacher_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        if self.args.self_distillation:
            self.teacher_model.requires_grad_(False)
        if self.is_deepspeed_enabled and self.args.paced_sampling == "weight":
            # DeepSpeed steps its optimiser inside its own engine, where the zero-weight step guard cannot reach.
            logger.warning(
                "Under DeepSpeed a PACED batch whose weights are all zero still takes an optimiser step: its gradient "
                "is zero, but AdamW's momentum and weight decay move the parameters. Use paced_sampling='sample' "
                "(zero-weight problems are never drawn) to avoid such batches, or DDP/FSDP, where the step is skipped."
            )
        self.pass_rate_table = PassRateTable(len(self.train_dataset))
        self.problem_sampler = ProblemSampler(
            self.pass_rate_table, self.args.paced_alpha, self.args.paced_beta, self.args.seed
        )
        self._training_rollouts = 0
        self._zero_weight_batches = 0
        # Σ of the PACED weights of the micro-batches since the last optimiser step (local), whether the coming step
        # is skipped because that sum is zero on every process, and the count of such steps (see `training_step`).
        self._step_weight: torch.Tensor | None = None
        self._skip_optimizer_step = False
        self._skipped_steps = 0
        self._rollout_source = self.args.rollout_source
        self._teacher_writes_completions = False
        self._generation_rows: list[dict] | None = None
        self._loss_weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self._teacher_sequence: tuple[torch.Tensor, torch.Tensor] | None = None
        self.add_callback(_PassRateCallback(self))

    # ---- Construction checks ----

    def _check_train_dataset(self, train_dataset, args: PacedConfig) -> Dataset:
        if train_dataset is None:
            raise ValueError("PacedTrainer needs a `train_dataset`: pass rates are estimated on its problems.")
        if isinstance(train_dataset, IterableDataset) or not hasattr(train_dataset, "__len__"):
            raise ValueError(
                "PacedTrainer needs a map-style `train_dataset` (a datasets.Dataset): every problem's pass rate is "
                "estimated before training. Load the dataset without `streaming=True`."
            )
        check_prompt_column(train_dataset, "train_dataset")
        check_train_rows(train_dataset)
        columns = train_dataset.column_names
        if "image" in columns or "images" in columns:
            raise ValueError("PacedTrainer supports text-only datasets; remove the `image`/`images` column.")
        self._privileged_column, self._privileged_template = None, None
        if args.self_distillation:
            self._privileged_column, self._privileged_template = privileged_context_setup(
                columns, args.privileged_context_column, args.privileged_prompt_template
            )
        # Pass rates grade training problems only; PACED's evaluation scores the divergence, no reward.
        check_reward_columns(self.reward_funcs, train_dataset)
        teacher_track = args.rollout_source == "teacher" or args.kl_schedule == "forward_then_reverse"
        if teacher_track and args.teacher_completions == "dataset" and "completion" not in columns:
            raise ValueError(
                "teacher_completions='dataset' trains on the dataset's `completion` column, which `train_dataset` "
                f"lacks (columns: {columns}). Add it, or set teacher_completions='generate' to sample from the "
                "teacher."
            )
        self._teacher_completion_source = (
            ("dataset" if "completion" in columns else "generate")
            if args.teacher_completions == "auto"
            else args.teacher_completions
        )
        if teacher_track and self._teacher_completion_source == "dataset":
            # Checked now rather than at the first teacher-track step, after the whole pass-rate estimation.
            check_completion_format(train_dataset, "train_dataset")
        if INDEX_COLUMN in columns:
            raise ValueError(
                f"`train_dataset` already has a `{INDEX_COLUMN}` column, which PacedTrainer adds to index the "
                "pass-rate table; rename or remove it."
            )
        return train_dataset.add_column(INDEX_COLUMN, list(range(len(train_dataset))))

    @staticmethod
    def _resolve_teacher(model, teacher_model, args: PacedConfig):
        if args.self_distillation:
            if teacher_model is not None:
                raise ValueError(
                    "self_distillation=True makes the teacher a frozen copy of the student; do not pass "
                    "`teacher_model`."
                )
            if isinstance(model, str):
                # A second load of the student's weights: the frozen copy. The student's quantisation does not apply.
                if args.teacher_model_init_kwargs is None:
                    args.teacher_model_init_kwargs = {
                        key: value
                        for key, value in (args.model_init_kwargs or {}).items()
                        if key not in ("quantization_config", "device_map")
                    } or None
                return model
            return copy.deepcopy(model).eval()
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError(
                "PacedTrainer needs a teacher: pass `teacher_model` (or set `teacher_model_name_or_path`), or set "
                "self_distillation=True to distil from a frozen copy of the student that sees the answer."
            )
        return teacher_model

    @staticmethod
    def _check_teacher_vocabulary(model, teacher_model, args, processing_class) -> int | None:
        if args is not None and args.self_distillation:
            return None  # the teacher is a copy of the student: its tokenizer and head
        return TipDistillTrainer._check_teacher_vocabulary(model, teacher_model, args, processing_class)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # With `remove_unused_columns=True`, keep what grading, self-distillation and teacher completions read.
        for name in ("answer", "completion", INDEX_COLUMN, self._privileged_column):
            if name is not None and name not in self._signature_columns:
                self._signature_columns.append(name)

    # ---- Pass rates ----

    def estimate_pass_rates(self) -> PassRateTable:
        """
        Estimate every training problem's pass rate with the current student: `pass_rate_rollouts` sampled rollouts
        per problem (vLLM when `use_vllm=True`), graded by the reward functions. Work is split over processes in
        batches of `pass_rate_batch_size` problems; every process ends with the whole table. Called when training
        starts (unless a checkpoint's table was restored) and, with `pass_rate_mode="refresh"`, on schedule.
        """
        table = estimate_pass_rates(
            self.pass_rate_table,
            self.train_dataset,
            tokenize_prompts=lambda prompts: self._tokenize_prompts(prompts)[0],
            sample_completions=self._sample_student_completions,
            grade=self._grade,
            accelerator=self.accelerator,
            rollouts=self.args.pass_rate_rollouts,
            per_process=self.args.pass_rate_batch_size
            or self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps,
            step=self.state.global_step,
            alpha=self.args.paced_alpha,
            beta=self.args.paced_beta,
            disable_progress=self.args.disable_tqdm,
        )
        # Logged with the next training metrics: problems no reward function could grade (e.g. an `answer` that is
        # not a mathematical object, such as "n/a"), which train with weight 0.
        num_unknown = int(torch.isnan(table.pass_rates).sum().item())
        self._metrics["train"]["paced/ungradable_problems"].append(float(num_unknown))
        return table

    def _sample_student_completions(self, prompt_ids: list[list[int]], num_generations: int) -> list[list[int]]:
        repeated = [ids for ids in prompt_ids for _ in range(num_generations)]
        if self.use_vllm:
            if self.state.global_step != self._last_loaded_step:
                self.vllm_generation.sync_weights()
                self._last_loaded_step = self.state.global_step
            _, completion_ids, _, _ = self.vllm_generation.generate(
                prompts=repeated, images=None, num_generations=num_generations
            )
            return completion_ids
        # TRL's own sampling path (bypassing this class's teacher-completion switch).
        return super()._generate_single_turn(repeated, None, {})

    def _grade(self, rows: list[dict], completion_ids: list[list[int]]) -> torch.Tensor:
        """Sum of the rewards of each completion: `(n,)` float32 in [0, 1], `NaN` where no function graded it."""
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        completions = (
            [[{"role": "assistant", "content": text}] for text in texts] if is_conversational(rows[0]) else texts
        )
        columns = {key: [row[key] for row in rows] for key in rows[0] if key not in ("prompt", "completion")}
        total = torch.zeros(len(rows))
        graded = torch.zeros(len(rows), dtype=torch.bool)
        for func in self.reward_funcs:
            rewards = func(
                prompts=[row["prompt"] for row in rows],
                completions=completions,
                completion_ids=completion_ids,
                trainer_state=self.state,
                **columns,
            )
            if len(rewards) != len(rows):
                raise ValueError(
                    f"Reward function {_reward_name(func)} returned {len(rewards)} rewards for {len(rows)} "
                    "completions."
                )
            values = torch.tensor([math.nan if r is None else float(r) for r in rewards])
            total += values.nan_to_num(0.0)
            graded |= ~torch.isnan(values)
        if ((total < 0) | (total > 1)).any():
            bad = total[(total < 0) | (total > 1)][0].item()
            raise ValueError(
                f"The rewards of a rollout summed to {bad}; PACED reads the summed reward of a rollout as its pass "
                f"score, which must lie in [0, 1]. Reward functions: "
                f"{', '.join(map(_reward_name, self.reward_funcs))}."
            )
        return torch.where(graded, total, torch.full_like(total, math.nan))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # Checkpoints save the model through here too, so the table lands in every checkpoint and in the final output.
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and self.pass_rate_table.is_estimated:
            os.makedirs(output_dir, exist_ok=True)
            self.save_pass_rates(os.path.join(output_dir, PASS_RATE_FILE))

    def save_pass_rates(self, path: str) -> None:
        """Write the pass-rate table (what a resumed run restores) to `path` as JSON."""
        save_pass_rate_table(self.pass_rate_table, path, self.train_dataset, self.args.pass_rate_rollouts)

    def load_pass_rates(self, path: str) -> None:
        """Restore a table written by [`~PacedTrainer.save_pass_rates`]; training then skips the initial estimation."""
        load_pass_rate_table(self.pass_rate_table, path, self.train_dataset)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Every resume path (DeepSpeed included) comes through here, before `on_train_begin` decides to estimate.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, PASS_RATE_FILE)
        if os.path.exists(path):
            self.load_pass_rates(path)
        else:
            logger.warning(f"{checkpoint} has no {PASS_RATE_FILE}; pass rates are estimated again.")

    def _checkpoint_files(self) -> list[str]:
        # Written by `save_model`, before transformers' trainer state.
        return [*super()._checkpoint_files(), PASS_RATE_FILE]

    def export_pass_rates(self, path: str | None = None) -> Dataset:
        """
        The pass-rate table joined with the training set (prompt, answer, ..., `pass_rate`, `num_graded_rollouts`,
        `weight`), as a [`~datasets.Dataset`]; also written to `path` when given (`.json`: one JSON list, `.jsonl`: one
        record per line).
        """
        exported = self.pass_rate_table.to_dataset(self.train_dataset, self.args.paced_alpha, self.args.paced_beta)
        if path is not None:
            if path.endswith(".jsonl"):
                exported.to_json(path, lines=True)
            elif path.endswith(".json"):
                with open(path, "w") as file:
                    json.dump(exported.to_list(), file, default=str)
            else:
                raise ValueError(f"export_pass_rates writes `.json` or `.jsonl` files, got {path!r}.")
        return exported

    # ---- Generation ----

    def _prepare_inputs(self, generation_batch):
        generates = self._step % self.args.gradient_accumulation_steps == 0 or self._buffered_inputs is None
        if self.model.training and generates and self.args.paced_sampling == "sample":
            # The dataloader's rows only set the batch size: the problems generated for are drawn from the table.
            generation_batch = self._draw_problems(generation_batch)
        return super()._prepare_inputs(generation_batch)

    def _draw_problems(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """This process's share of the step's weighted draw, as rows with the columns of the dataloader's `rows`."""
        indices = self.problem_sampler.draw_share(
            self.state.global_step, len(rows), self.accelerator.num_processes, self.accelerator.process_index
        ).tolist()
        drawn = self.train_dataset.select_columns(list(rows[0]))[indices]
        return [{key: drawn[key][i] for key in drawn} for i in range(len(indices))]

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        training = self.model.training
        if training:
            self.beta, self._rollout_source = paced_phase(
                self.state.global_step,
                self.state.max_steps,
                self.args.kl_schedule,
                self.args.schedule_switch_fraction,
                self.args.rollout_source,
                self.args.beta,
            )
        self._teacher_writes_completions = training and self._rollout_source == "teacher"
        self._generation_rows = inputs
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._teacher_writes_completions = False
            self._generation_rows = None
        device = output["prompt_ids"].device
        if self.args.self_distillation:
            teacher_prompt_ids = self._privileged_prompt_ids(inputs)
            output.update(
                pad_teacher_prompts(teacher_prompt_ids, self._tokenizer.pad_token_id, self.pad_to_multiple_of, device)
            )
        if training:
            self._add_problem_weights(inputs, output)
        return output

    def _add_problem_weights(self, inputs: list[dict[str, Any]], output: dict[str, Any]) -> None:
        device = output["prompt_ids"].device
        indices = torch.tensor([row[INDEX_COLUMN] for row in inputs])
        weights = self.pass_rate_table.weights(self.args.paced_alpha, self.args.paced_beta, indices)
        pass_rates = self.pass_rate_table.pass_rates[indices]
        all_weights = self.accelerator.gather(weights.to(device)).cpu()
        all_rates = self.accelerator.gather(pass_rates.to(device)).cpu()
        self._training_rollouts += all_weights.numel()
        # Per-rollout loss weights travel with the batch (split with it over accumulation steps); their sum over the
        # whole generation batch of every process is the loss normaliser, like TRL's `num_items_in_batch`. Problems
        # drawn in proportion to their weight ("sample") take the plain mean: a weight of 1 each.
        loss_weights = torch.ones_like(weights) if self.args.paced_sampling == "sample" else weights
        output["paced_weights"] = loss_weights.to(device)
        weight_sum = float(all_weights.numel()) if self.args.paced_sampling == "sample" else all_weights.sum()
        output["paced_weight_sum"] = torch.as_tensor(weight_sum, dtype=torch.float32).to(device)
        if weight_sum == 0:
            self._zero_weight_batches += 1

        metrics = self._metrics["train"]
        metrics["paced/weight_mean"].append(all_weights.mean().item())
        metrics["paced/weight_max"].append(all_weights.max().item())
        metrics["paced/zero_weight_share"].append((all_weights == 0).float().mean().item())
        metrics["paced/zero_weight_batches"] = [float(self._zero_weight_batches)]
        known = ~torch.isnan(all_rates)
        metrics["paced/pass_rate_mean"].append(all_rates[known].mean().item() if known.any() else math.nan)
        metrics["paced/beta"].append(float(self.beta))
        metrics["paced/teacher_rollouts"].append(float(self._rollout_source == "teacher"))
        for name, share in self.pass_rate_table.histogram().items():
            if name != "unknown" or share:
                metrics[f"paced/pass_rate_share_{name}"].append(share)
        metrics["paced/table_weight_mean"].append(
            self.pass_rate_table.weights(self.args.paced_alpha, self.args.paced_beta).mean().item()
        )
        metrics["paced/pass_rate_estimates"] = [float(self.pass_rate_table.estimates)]
        metrics["paced/training_rollouts"] = [float(self._training_rollouts)]

        if self.args.pass_rate_mode == "online" and self._rollout_source == "student":
            completion_ids = [
                ids[mask.bool()].tolist()
                for ids, mask in zip(output["completion_ids"].cpu(), output["completion_mask"].cpu(), strict=True)
            ]
            rewards = self._grade(inputs, completion_ids)
            all_indices = self.accelerator.gather(indices.to(device)).cpu()
            all_rewards = self.accelerator.gather(rewards.to(device)).cpu()
            # Weights above come from the table before these rollouts: a rollout never sets its own weight.
            self.pass_rate_table.update_online(all_indices, all_rewards, self.args.pass_rate_ema)
            graded = ~torch.isnan(all_rewards)
            mean_reward = all_rewards[graded].mean().item() if graded.any() else math.nan
            metrics["paced/rollout_reward_mean"].append(mean_reward)

    def _privileged_prompt_ids(self, rows: list[dict[str, Any]]) -> list[torch.Tensor]:
        prompts = [
            add_privileged_context(row["prompt"], row[self._privileged_column], self._privileged_template)
            for row in rows
        ]
        prompt_ids, _, _ = self._tokenize_prompts(prompts)
        return [torch.tensor(ids) for ids in prompt_ids]

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if not self._teacher_writes_completions:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        rows = self._generation_rows
        if self._teacher_completion_source == "dataset":
            return [self._reference_completion_ids(row) for row in rows]
        if self.args.self_distillation:
            prompt_ids = [ids.tolist() for ids in self._privileged_prompt_ids(rows)]
        return self._generate_with_teacher(prompt_ids)

    def _reference_completion_ids(self, row: dict[str, Any]) -> list[int]:
        """The dataset's `completion` as the tokens a model writes after the prompt, up to its first end of turn."""
        completion = row["completion"]
        if is_conversational(row):
            kwargs = {"tokenize": True, **self.chat_template_kwargs}
            prefix = self.processing_class.apply_chat_template(row["prompt"], add_generation_prompt=True, **kwargs)
            full = self.processing_class.apply_chat_template(row["prompt"] + completion, **kwargs)
            prefix = list(prefix["input_ids"] if hasattr(prefix, "keys") else prefix)
            full = list(full["input_ids"] if hasattr(full, "keys") else full)
            if full[: len(prefix)] != prefix:
                raise ValueError(
                    "The chat template renders the prompt differently with and without the reference completion, so "
                    "the completion's tokens cannot be isolated; set teacher_completions='generate'."
                )
            ids = full[len(prefix) :]
            ends = [position for position, token in enumerate(ids) if token in self.eos_token_ids]
            ids = ids[: ends[0] + 1] if ends else ids
        else:
            ids = self._tokenizer(completion, add_special_tokens=False)["input_ids"] + [self._tokenizer.eos_token_id]
        # Like a student rollout, a reference longer than max_completion_length is clipped.
        return ids[: self.max_completion_length] if self.max_completion_length else ids

    @torch.no_grad()
    def _generate_with_teacher(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        device = self.accelerator.device
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(prompts, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(ids) for ids in prompts], padding_value=0, padding_side="left")
        attention_mask = attention_mask.to(device)
        with unwrap_model_for_generation(
            self.teacher_model,
            self.accelerator,
            gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            generation_kwargs=self.generation_kwargs,
        ) as teacher:
            generated = teacher.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=self.generation_config
            )
        return completion_ids_until_eos(generated[:, input_ids.size(1) :], self.eos_token_ids)

    # ---- Loss ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # transformers' `Trainer` marks the micro-batch after which it steps the optimiser with `sync_gradients`.
        if self.accelerator.sync_gradients:
            self._skip_optimizer_step = self._step_weighs_nothing()
            if self._skip_optimizer_step:
                # Torch's optimisers leave a parameter without a gradient alone: no momentum, no weight decay, no
                # state update. The schedule is held by `_HeldOnSkippedSteps`.
                model.zero_grad(set_to_none=True)
        return loss

    def _step_weighs_nothing(self) -> bool:
        """
        Whether the coming optimiser step's micro-batches all carry zero PACED weight on every process. Such a step
        is skipped, its learning-rate step included: its gradient is zero, but AdamW would still move the parameters
        (its momentum, and decoupled weight decay). DeepSpeed steps inside its engine instead, where the trainer does
        not skip.
        """
        weight, self._step_weight = self._step_weight, None
        if weight is None or self.is_deepspeed_enabled:
            return False
        # Every process runs the micro-batch that ends an accumulation window, so this collective is matched.
        total = self.accelerator.reduce(weight.to(self.accelerator.device), reduction="sum")
        if total.item() != 0:
            return False
        self._skipped_steps += 1
        self._metrics["train"]["paced/skipped_steps"] = [float(self._skipped_steps)]
        return True

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if (
            not self.is_deepspeed_enabled
            and not isinstance(scheduler, (_HeldOnSkippedSteps, *_SCHEDULERS_STEPPED_ON_METRICS))
        ):
            self.lr_scheduler = scheduler = _HeldOnSkippedSteps(scheduler, lambda: self._skip_optimizer_step)
        return scheduler

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        if self.model.training and "paced_weights" in inputs:
            local = inputs["paced_weights"].detach().float().sum()
            self._step_weight = local if self._step_weight is None else self._step_weight + local
            # The per-process share of the global weight sum: DDP averages gradients over processes, as TRL's
            # `num_items_in_batch` is divided by the process count.
            self._loss_weights = (
                inputs["paced_weights"],
                inputs["paced_weight_sum"] / self.accelerator.num_processes,
            )
        if "teacher_prompt_ids" in inputs:
            # The teacher reads its own prompt followed by the same completion; TRL keeps the last
            # `completion length` positions of both, which aligns them on the completion tokens.
            self._teacher_sequence = (
                torch.cat([inputs["teacher_prompt_ids"], inputs["completion_ids"]], dim=1),
                torch.cat([inputs["teacher_prompt_mask"], inputs["completion_mask"]], dim=1),
            )
        try:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        finally:
            self._loss_weights = None
            self._teacher_sequence = None

    def _selective_divergence_loss(self, *args, **kwargs):
        if self._loss_weights is not None:
            kwargs["rollout_weights"], kwargs["weight_sum"] = self._loss_weights
        return super()._selective_divergence_loss(*args, **kwargs)

    def _get_last_hidden_state(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs):
        if self._teacher_sequence is not None and unwrapped_model is self.accelerator.unwrap_model(self.teacher_model):
            input_ids, attention_mask = self._teacher_sequence
        return super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)
