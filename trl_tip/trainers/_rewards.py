"""
Reward functions in the trainers that grade rollouts without training on the rewards (PACED's pass rates, OPSDC's
logged accuracy): one way to accept them and one way to call them.

TRL's `GRPOTrainer._calculate_rewards` is a method of GRPO's trainer: it reads GRPO's own state (reward processing
classes, the async loop, environments) and gathers the rewards of all processes, which these trainers do themselves
on the indices they need. Calling it here would mean building that state on a distillation trainer, so the call is
written once here instead, with TRL's argument names, its `None` → NaN convention, its length check and its
per-function profiling block (`profiling_context`, logged as `<Trainer>.<reward name>` like GRPO's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from trl.data_utils import is_conversational
from trl.extras.profiling import profiling_context

from ..rewards import BUILTIN_REWARDS
from ._inputs import reward_function_name


def resolve_reward_funcs(reward_funcs, *, trainer: str, required: bool, purpose: str) -> list[Callable]:
    """
    Reward functions as a list of callables with TRL's reward signature; a string names a built-in reward
    (`"math"` → [`~trl_tip.math_reward`]). `purpose` finishes the error messages ("to grade the student's rollouts
    into pass rates"). With `required=False`, `None` gives an empty list.
    """
    if reward_funcs is None and not required:
        return []
    if reward_funcs is None:
        funcs = []
    else:
        funcs = list(reward_funcs) if isinstance(reward_funcs, list | tuple) else [reward_funcs]
    if not funcs:
        raise ValueError(
            f"{trainer} needs `reward_funcs` {purpose}: pass trl_tip.math_reward (or 'math') for math answers, or "
            "your own TRL-style reward functions."
        )
    resolved = []
    for func in funcs:
        if isinstance(func, str):
            if func not in BUILTIN_REWARDS:
                raise ValueError(
                    f"Unknown reward {func!r}: {trainer} accepts callables with TRL's reward signature or the name of "
                    f"a built-in reward ({', '.join(BUILTIN_REWARDS)}). Reward models are not supported."
                )
            func = BUILTIN_REWARDS[func]
        elif not callable(func):
            raise TypeError(
                f"{trainer}'s reward_funcs must be callables with TRL's reward signature or built-in reward names, "
                f"got {type(func).__name__}."
            )
        resolved.append(func)
    return resolved


def reward_table(trainer, reward_funcs: Sequence[Callable], rows: list[dict], completion_ids: list[list[int]]):
    """
    Call each reward function on the decoded completions of `rows` (this process's rows, one per completion) as TRL's
    GRPO does: keyword arguments `prompts`, `completions` (chat messages when the prompts are conversational),
    `completion_ids`, `trainer_state` and every other dataset column. Returns `(len(rows), len(reward_funcs))`
    float32 on the CPU, `NaN` where a function returned `None` (it could not grade the completion).
    """
    texts = trainer.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
    conversational = is_conversational(rows[0])
    completions = [[{"role": "assistant", "content": text}] for text in texts] if conversational else texts
    skipped = ("prompt", "completion", "completion_ids")
    columns = {key: [row[key] for row in rows] for key in rows[0] if key not in skipped}
    table = torch.empty(len(rows), len(reward_funcs))
    for index, func in enumerate(reward_funcs):
        name = reward_function_name(func)
        with profiling_context(trainer, name):
            rewards = func(
                prompts=[row["prompt"] for row in rows],
                completions=completions,
                completion_ids=completion_ids,
                trainer_state=trainer.state,
                **columns,
            )
        if len(rewards) != len(rows):
            raise ValueError(
                f"The reward function '{name}' returned {len(rewards)} rewards, but {len(rows)} were expected (one "
                "per prompt-completion pair). Make sure the reward function returns exactly one reward per completion."
            )
        table[:, index] = torch.tensor([math.nan if reward is None else float(reward) for reward in rewards])
    return table
