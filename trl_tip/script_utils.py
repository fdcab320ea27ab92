"""Helpers shared by the example scripts: parsing with built-in-task defaults, before/after evaluation, the end of a
run."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback


# transformers 5 renamed gradient checkpointing to activation checkpointing and warns on each old name that TRL still
# uses (the `gradient_checkpointing` config field its configs default to True, and `gradient_checkpointing_enable` /
# `_disable` / `is_gradient_checkpointing` around every generation). The aliases keep working until v6, and nothing a
# user does can quiet them, so the example scripts hide exactly these messages.
CHECKPOINTING_RENAME_WARNING = (
    r"`(is_)?gradient_checkpointing(_[a-z]+)?` is deprecated and will be removed in v6\. "
    r"Use `(is_)?activation_checkpointing(_[a-z]+)?` instead\."
)


def silence_checkpointing_renames() -> None:
    """Hide transformers' FutureWarnings about the gradient → activation checkpointing renames, and nothing else."""
    warnings.filterwarnings("ignore", message=CHECKPOINTING_RENAME_WARNING, category=FutureWarning)


def parse_with_builtin_defaults(make_parser: Callable, builtin_defaults: dict[str, Any]) -> tuple:
    """
    Parse the command line (and `--config` YAML) the TRL way; when no model is given, parse again with the built-in
    task's settings as defaults.

    Transformers' warnings about the gradient-checkpointing renames are silenced first
    ([`silence_checkpointing_renames`]). Precedence stays TRL's: command-line flags over the YAML file over defaults. Only the defaults change, so
    `python examples/x.py --max_steps 10` runs the built-in task for 10 steps, and any run that names
    `--model_name_or_path` (on the command line or in the YAML) is untouched.

    Args:
        make_parser (`Callable`): builds a fresh `trl.TrlParser` over the script's dataclasses.
        builtin_defaults (`dict`): field name → value used when no model is given.

    Returns:
        `tuple`: the parsed dataclasses, followed by `True` when the built-in task's defaults were used.
    """
    silence_checkpointing_renames()
    # TRL's distillation and GRPO configs default to bf16, which transformers rejects on a machine without a GPU, and
    # pinned dataloader memory, which has nothing to pin for (and warns about) there.
    device_defaults = {} if torch.cuda.is_available() else {"bf16": False, "dataloader_pin_memory": False}
    parser = make_parser()
    parser.set_defaults(**device_defaults)
    parsed = parser.parse_args_and_config()
    model_args = next(arg for arg in parsed if hasattr(arg, "model_name_or_path"))
    if model_args.model_name_or_path is not None:
        return (*parsed, False)
    parser = make_parser()
    parser.set_defaults(**{**device_defaults, **builtin_defaults})
    return (*parser.parse_args_and_config(), True)


def evaluate_split(model, tokenizer, dataset, max_new_tokens: int, batch_size: int = 256) -> dict | None:
    """
    Greedy accuracy (math reward) and mean completion tokens on a split with `prompt` and `answer` columns; `None`
    when the split has no `answer` column to grade against.
    """
    from .tasks.arithmetic import evaluate_accuracy

    if dataset is None or "answer" not in dataset.column_names:
        return None
    return evaluate_accuracy(model, tokenizer, dataset, max_new_tokens=max_new_tokens, batch_size=batch_size)


def as_chat_prompts(dataset, answer_column: str = "answer", wrap_plain_prompts: bool = True):
    """
    Ready a prompt dataset (a `Dataset` or `DatasetDict`) for the trainers: rename `answer_column` to `answer`, and,
    with `wrap_plain_prompts`, turn plain-text prompts into one user message so the model's chat template applies
    (e.g. `open-r1/DAPO-Math-17k-Processed` stores prompts as plain text).
    """
    splits = dataset.values() if hasattr(dataset, "values") else [dataset]
    columns = next(iter(splits)).column_names
    if "prompt" not in columns:
        raise ValueError(f"The dataset has columns {columns} but no `prompt` column; rename the prompt column to `prompt`.")
    if answer_column != "answer":
        if answer_column not in columns:
            raise ValueError(f"--answer_column {answer_column!r} is not a column of the dataset ({columns}).")
        if "answer" in columns:
            raise ValueError(f"The dataset has both `answer` and `{answer_column}`; pick one with --answer_column.")
        dataset = dataset.rename_column(answer_column, "answer")
    if wrap_plain_prompts:
        def wrap(row):
            prompt = row["prompt"]
            return {"prompt": [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt}

        dataset = dataset.map(wrap)
    return dataset


def _greedy_records(model, tokenizer, dataset, max_new_tokens: int, batch_size: int) -> list[tuple[float, int]]:
    # (score, completion tokens incl. end of turn) per problem, as `evaluate_accuracy` counts them.
    from .rewards import grade_answer
    from .tasks.arithmetic import generate_completions

    completions = generate_completions(model, tokenizer, list(dataset["prompt"]), max_new_tokens, batch_size)
    return [
        (grade_answer(completion, gold) or 0.0, len(tokenizer(completion, add_special_tokens=False)["input_ids"]) + 1)
        for completion, gold in zip(completions, list(dataset["answer"]), strict=True)
    ]


def evaluate_split_with_trainer(trainer, dataset, max_new_tokens: int, batch_size: int = 256) -> dict | None:
    """
    [`evaluate_split`] of the trainer's own (prepared, possibly sharded) student, on every process.

    Every process generates for its share of the problems, padded to equal length
    ([`~trl_tip.eval_callback.padded_shard`]), inside TRL's generation unwrapping: under ZeRO-3 the weights are gathered
    for generation, under FSDP2 each rank generates with its shards, and in both every `generate` step is a
    collective every rank must make. Call it on every process, after the model is prepared (from `on_train_begin` on,
    see [`EvaluateAtTrainBegin`]); every process gets the summary.
    """
    from .eval_callback import map_over_processes

    if dataset is None or "answer" not in dataset.column_names:
        return None
    records = map_over_processes(
        trainer,
        dataset,
        lambda model, tokenizer, shard: _greedy_records(model, tokenizer, shard, max_new_tokens, batch_size),
    )
    return {
        "accuracy": sum(score for score, _ in records) / len(records),
        "mean_completion_tokens": sum(tokens for _, tokens in records) / len(records),
        "num_problems": len(records),
    }


class EvaluateAtTrainBegin(TrainerCallback):
    """
    Run `evaluate()` once, when training begins: after the trainer has prepared (wrapped, sharded) the model and
    before the first step, so a "before" measurement uses the very model that trains, on every process.
    The result is in `self.result`.
    """

    def __init__(self, evaluate: Callable[[], Any]):
        self.evaluate = evaluate
        self.result = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.result is None:
            self.result = self.evaluate()


def end_distributed() -> None:
    """
    Destroy the default process group at the end of a script, as `Accelerator.end_training()` does.

    Left to interpreter exit, a process group's communication threads are torn down in no defined order, and under
    DeepSpeed on gloo a rank that finished first was seen to abort (SIGABRT, "terminate called without an active
    exception") after training and saving had succeeded. Nothing happens outside a distributed run.

    A colocated vLLM engine (`use_vllm=True`, `vllm_mode="colocate"`) is shut down first: its shutdown, otherwise run
    at interpreter exit, destroys vLLM's process groups and fails once the default group is gone ("Invalid process
    group specified").
    """
    shutdown_vllm()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shutdown_vllm() -> None:
    """
    Shut down the vLLM engines of this process and vLLM's process groups (the default one included, which vLLM
    shares). Nothing happens where vLLM was never imported or built no engine.
    """
    import sys

    if "vllm" not in sys.modules:
        return
    import gc

    # Engines no longer referenced (the script's trainers are gone) run their own shutdown when collected.
    gc.collect()
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory, model_parallel_is_initialized

    if model_parallel_is_initialized():
        cleanup_dist_env_and_memory()


def reset_for_another_trainer(args) -> None:
    """
    Let a script build a second trainer in the same process under DeepSpeed (e.g. a baseline, then the method).

    accelerate refuses a second `Accelerator` built with a DeepSpeed plugin; building `TrainingArguments` resets its
    state, but a config built earlier (or copied) does not. This resets it and gives `args` a fresh plugin, as
    transformers' hyperparameter search does between trials. Nothing happens outside DeepSpeed.
    """
    from accelerate.state import AcceleratorState, is_initialized
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from ._trl_compat import reset_accelerator_state

    if not is_initialized() or AcceleratorState().distributed_type != DistributedType.DEEPSPEED:
        return
    reset_accelerator_state()
    if getattr(args, "deepspeed", None):
        from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

        args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
        args.hf_deepspeed_config.trainer_config_process(args)
        args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)
    else:
        args.deepspeed_plugin = DeepSpeedPlugin()
        args.deepspeed_plugin.set_mixed_precision(args.mixed_precision)
        args.deepspeed_plugin.set_deepspeed_weakref()
