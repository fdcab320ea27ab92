"""The bridge's evaluation of a checkpoint on the test split, and the table of the stages' results."""

from __future__ import annotations

import time

import torch

from ..script_utils import evaluate_split
from .arguments import BridgeScriptArguments


def evaluate_checkpoint(path: str, test_split, script_args: BridgeScriptArguments, max_new_tokens: int, seed: int):
    """
    Greedy accuracy, then mean@n / pass@k and mean completion tokens from `eval_num_samples` samples.

    Args:
        path (`str`):
            The model to evaluate (an initial model or a stage's output directory), loaded on the GPU if there is one.
        test_split (`datasets.Dataset`):
            Prompts and final answers.
        script_args ([`BridgeScriptArguments`]):
            `eval_num_samples`, `eval_temperature` and `eval_batch_size`.
        max_new_tokens (`int`):
            The completion budget.
        seed (`int`):
            Seed of the sampling.

    Returns:
        `dict`: `num_problems`, `greedy_accuracy`, `greedy_mean_completion_tokens`; with samples also `num_samples`,
        `temperature`, `mean_accuracy`, `pass_at_k` (keyed by `str(k)`, as JSON keys them) and
        `mean_completion_tokens`; and `seconds`, the time the evaluation took.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_tip.evaluation import evaluate_pass_at_k

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path)
    if torch.cuda.is_available():
        model = model.to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    greedy = evaluate_split(model, tokenizer, test_split, max_new_tokens, batch_size=script_args.eval_batch_size)
    result = {
        "num_problems": greedy["num_problems"],
        "greedy_accuracy": greedy["accuracy"],
        "greedy_mean_completion_tokens": greedy["mean_completion_tokens"],
    }
    if script_args.eval_num_samples > 0:
        sampled = evaluate_pass_at_k(
            model,
            tokenizer,
            test_split,
            num_samples=script_args.eval_num_samples,
            max_new_tokens=max_new_tokens,
            temperature=script_args.eval_temperature,
            batch_size=script_args.eval_batch_size,
            seed=seed,
        )
        result.update(
            num_samples=sampled["num_samples"],
            temperature=script_args.eval_temperature,
            mean_accuracy=sampled["mean_accuracy"],
            pass_at_k={str(k): value for k, value in sampled["pass_at_k"].items()},  # as JSON keys them
            mean_completion_tokens=sampled["mean_completion_tokens"],
        )
    result["seconds"] = time.perf_counter() - started
    del model
    return result


def format_table(rows: list[dict], test_name: str = "test") -> str:
    """
    The per-stage table the bridge prints.

    Args:
        rows (`list[dict]`):
            The rows [`run_bridge`] returns: `stage`, `model`, `test` (an [`evaluate_checkpoint`] result or `None`),
            and for trained stages `train_seconds` and `reused`.
        test_name (`str`, *optional*, defaults to `"test"`):
            How the title names the test problems.

    Returns:
        `str`: a title line, a header and one line per row.
    """
    sampled = next((row["test"] for row in rows if row.get("test") and "pass_at_k" in row["test"]), None)
    n = sampled["num_samples"] if sampled else None
    header = f"{'stage':<12}{'model':<9}{'greedy acc':>11}"
    if n:
        header += f"{f'mean@{n}':>9}{f'pass@{n}':>9}{'tokens':>8}"
    header += f"{'train s':>9}"
    lines = []
    for row in rows:
        test = row.get("test") or {}
        line = f"{row['stage']:<12}{row['model']:<9}"
        line += f"{100 * test['greedy_accuracy']:>10.1f}%" if test else f"{'-':>11}"
        if n:
            if "pass_at_k" in test:
                line += f"{100 * test['mean_accuracy']:>8.1f}%{100 * test['pass_at_k'][str(n)]:>8.1f}%"
                line += f"{test['mean_completion_tokens']:>8.1f}"
            else:
                line += f"{'-':>9}{'-':>9}{'-':>8}"
        seconds = row.get("train_seconds")
        line += f"{seconds:>9.0f}" if seconds is not None else f"{'':>9}"
        if row.get("reused"):
            line += "  (reused)"
        lines.append(line)
    evaluated = [row["test"] for row in rows if row.get("test")]
    if not evaluated:
        title = "\nBridge stages (not evaluated; evaluate the checkpoints with `trl-tip eval`)"
    else:
        title = f"\nBridge: accuracy on {evaluated[0]['num_problems']} {test_name} problems after each stage"
        if n:
            title += f" (greedy; mean@{n} and pass@{n} from {n} samples at T={sampled['temperature']:g})"
    return "\n".join([title + ":", header, *lines])
