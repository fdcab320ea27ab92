"""Checks every trainer runs on its inputs at construction, so bad data or settings fail before any rollout."""

from __future__ import annotations

import math
from typing import Any

from trl.trainer.utils import get_config_model_id


def _named_datasets(train_dataset, eval_dataset) -> list[tuple[str, Any]]:
    named = [] if train_dataset is None else [("train_dataset", train_dataset)]
    if isinstance(eval_dataset, dict):
        named += [(f"eval_dataset[{key!r}]", dataset) for key, dataset in eval_dataset.items()]
    elif eval_dataset is not None:
        named.append(("eval_dataset", eval_dataset))
    return named


def check_prompt_column(dataset, name: str) -> None:
    """Fail before any model is loaded when a map-style dataset lacks the `prompt` column on-policy training needs."""
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, dict):  # a DatasetDict passed where a split was expected
        raise ValueError(f"`{name}` is a DatasetDict with splits {sorted(columns)}; pass one split, e.g. dataset['train'].")
    if columns is not None and "prompt" not in columns:
        raise ValueError(
            f"`{name}` has columns {columns} but no `prompt` column. On-policy training generates from the prompts: "
            "rename your prompt column to `prompt` (plain text or a list of chat messages)."
        )


def _prompt_kind(prompt: Any) -> str:
    return "plain" if isinstance(prompt, str) else "conversational"


def check_train_rows(train_dataset) -> None:
    """Fail on a map-style training set without rows, which would train for zero steps without a word."""
    if _is_map_style(train_dataset) and len(train_dataset) == 0:
        raise ValueError(
            "`train_dataset` has no rows, so there is nothing to train on. Check the split and any filtering that "
            "built it."
        )


def _is_map_style(dataset) -> bool:
    return getattr(dataset, "column_names", None) is not None and hasattr(dataset, "__len__")


def check_prompts(train_dataset, eval_dataset=None) -> None:
    """
    Check the training and evaluation datasets (map-style ones; a streamed dataset is read lazily and cannot be
    checked up front): a training set with rows, and in each a `prompt` column with no empty plain-string prompt (an
    empty prompt tokenises to no ids, which the generation step cannot embed).
    """
    check_train_rows(train_dataset)
    for name, dataset in _named_datasets(train_dataset, eval_dataset):
        check_prompt_column(dataset, name)
        columns = getattr(dataset, "column_names", None)
        if columns is None or not hasattr(dataset, "__len__"):
            continue
        for index, prompt in enumerate(dataset["prompt"]):
            if isinstance(prompt, str) and not prompt.strip():
                raise ValueError(
                    f"`{name}` row {index} has an empty `prompt`. Every prompt needs text to generate from: remove "
                    "or fill the empty rows (e.g. dataset.filter(lambda row: row['prompt'].strip()))."
                )
            if not isinstance(prompt, str | list):
                raise ValueError(
                    f"`{name}` row {index} has a `prompt` of type {type(prompt).__name__}; a prompt is a string or "
                    "a list of chat messages."
                )


def check_reward_columns(reward_funcs, train_dataset, eval_dataset=None) -> None:
    """
    Fail when the built-in [`~trl_tip.math_reward`] is among `reward_funcs` and a map-style dataset whose rollouts it
    grades (the training set, and every evaluation set given) has no `answer` column to grade against. Without this
    check the first rollouts would be generated before the reward fails.
    """
    from ..rewards import math_reward

    funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not any(func is math_reward for func in funcs):
        return
    for name, dataset in _named_datasets(train_dataset, eval_dataset):
        columns = getattr(dataset, "column_names", None)
        if columns is not None and not isinstance(columns, dict) and "answer" not in columns:
            raise ValueError(
                f"`{name}` has columns {columns} but no `answer` column, which the built-in math reward "
                "(trl_tip.math_reward) grades the rollouts against. Add the ground-truth final answers as an "
                "`answer` column (e.g. dataset.rename_column('solution', 'answer'))."
            )


def check_completion_format(dataset, name: str) -> None:
    """
    Fail when a dataset's `completion` column is in another format than its `prompt` column (a plain string after a
    conversational prompt, or chat messages after a plain prompt): the two are rendered together into one sequence.
    """
    columns = getattr(dataset, "column_names", None)
    if columns is None or "completion" not in columns or "prompt" not in columns:
        return
    for index, (prompt, completion) in enumerate(zip(dataset["prompt"], dataset["completion"], strict=True)):
        if completion is None or (isinstance(completion, str | list) and not completion):
            raise ValueError(
                f"`{name}` row {index} has an empty `completion`, which the teacher track trains on; fill or remove it, "
                "or set teacher_completions='generate' to sample from the teacher."
            )
        if _prompt_kind(prompt) != _prompt_kind(completion):
            raise ValueError(
                f"`{name}` row {index} has a {_prompt_kind(prompt)} `prompt` but a {_prompt_kind(completion)} "
                "`completion`; both must be plain strings or both lists of chat messages (a conversational completion "
                "is e.g. [{'role': 'assistant', 'content': '...'}])."
            )


def check_sampling(temperature: float, generation_kwargs: dict | None, greedy_error: str | None = None) -> None:
    """
    Fail on sampling settings the losses cannot use. The logits are divided by `temperature` when rollouts are scored,
    so it must be a positive finite number (vLLM's "temperature 0 means greedy" would divide by zero). Greedy decoding
    is `generation_kwargs={"do_sample": False}` with a positive temperature; where it cannot work either,
    `greedy_error` says why and `do_sample=False` is refused.
    """
    if isinstance(temperature, bool) or not (
        isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(
            f"temperature must be a positive number, got {temperature!r}: the loss divides the logits by it. Use "
            "1.0 (the papers' setting); for greedy rollouts set generation_kwargs={'do_sample': False} and keep "
            "temperature positive."
        )
    if greedy_error is not None and (generation_kwargs or {}).get("do_sample") is False:
        raise ValueError(f"generation_kwargs sets do_sample=False, which cannot train here: {greedy_error}")


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS, ...) that pinned host memory would speed transfers to."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available()


def pin_memory_where_it_helps(config) -> None:
    """
    Turn `dataloader_pin_memory` off when there is no accelerator: pinning only speeds host-to-device copies, and
    without a device torch's DataLoader warns on every dataloader it builds that pinned memory will not be used.
    """
    if config.dataloader_pin_memory and not accelerator_available():
        config.dataloader_pin_memory = False


def default_config(config_class: type, model, method: str):
    """
    The config a trainer builds when given `args=None`, as TRL's trainers do: `config_class("<model name>-<method>")`,
    the model name being the last part of `model`'s path or Hub id (or of its config's). Built before any model is
    loaded, so that the config's own checks come first.
    """
    model_name = model if isinstance(model, str) else get_config_model_id(model.config)
    return config_class(f"{model_name.split('/')[-1]}-{method}")


def model_written_mask(batch: dict[str, Any]):
    """
    The completion tokens the policy wrote: `completion_mask`, without the tokens a tool returned (`tool_mask`, which
    TRL's GRPO sets when tools are used). Losses, lengths and confidence are measured on these.
    """
    mask = batch["completion_mask"]
    if "tool_mask" in batch:
        mask = mask * batch["tool_mask"]
    return mask


def reward_function_name(func) -> str:
    """The name TRL logs a reward function under (`rewards/<name>/mean`): its `__name__`, else its class name."""
    return getattr(func, "__name__", type(func).__name__)
