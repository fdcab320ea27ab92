"""PACED's pure helpers: the KL schedule, the self-distillation teacher's privileged prompt, reward functions."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .paced_config import BUILTIN_REWARDS, KL_SCHEDULES


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

