"""Sampling evaluation: unbiased pass@k, mean@n and completion length, graded by the math reward."""

from __future__ import annotations

import math

import torch

from .rewards import grade_answer
from .tasks.arithmetic import generate_completions


def pass_at_k(n: int, c: int, k: int) -> float:
    """
    Unbiased pass@k estimate for one problem: `1 − C(n−c, k) / C(n, k)`, the probability that at least one of `k`
    completions drawn without replacement from `n` samples, `c` of them correct, is correct.

    Args:
        n (`int`): samples drawn for the problem, `>= 1`.
        c (`int`): correct samples among them, `0 <= c <= n`.
        k (`int`): budget, `1 <= k <= n`.

    Example:

    ```python
    >>> pass_at_k(4, 1, 2)  # 1 - C(3, 2) / C(4, 2) = 1 - 3/6
    0.5
    ```
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"pass_at_k expects integer {name}, got {value!r}.")
    if n < 1:
        raise ValueError(f"pass_at_k needs n >= 1 samples, got n={n}.")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got c={c}, n={n}.")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got k={k}, n={n}.")
    # Exact integer binomials: no cancellation for the n of a sampling evaluation.
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate_pass_at_k(
    model,
    tokenizer,
    dataset,
    num_samples: int = 8,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    batch_size: int = 512,
    seed: int | None = 0,
) -> dict:
    """
    Sample `num_samples` completions per problem of a split and grade them with the math reward.

    Args:
        model ([`~transformers.PreTrainedModel`]): the model to sample from.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): its tokenizer, with a chat template and left padding.
        dataset ([`~datasets.Dataset`]): a split with conversational `prompt` and gold `answer` columns.
        num_samples (`int`, *optional*, defaults to `8`): completions per problem (`n`).
        max_new_tokens (`int`, *optional*, defaults to `32`): length limit of a completion.
        temperature (`float`, *optional*, defaults to `1.0`): sampling temperature.
        batch_size (`int`, *optional*, defaults to `512`): sequences per `generate` call.
        seed (`int` or `None`, *optional*, defaults to `0`): seed of the sampling, which then leaves the global
            random state untouched; `None` samples from (and advances) the global random state.

    Returns:
        `dict`: `mean_accuracy` (mean@n: accuracy averaged over all samples), `pass_at_k` (`{k: pass@k}` for
        `k = 1..n`, each the mean over problems of the unbiased estimate), `mean_completion_tokens` (the decoded
        completion re-encoded, plus one for the end-of-turn token, as [`~trl_tip.tasks.evaluate_accuracy`] counts
        them; exact for text that round-trips, such as the built-in task's), `num_problems` and `num_samples`.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    for column in ("prompt", "answer"):
        if column not in dataset.column_names:
            raise ValueError(f"evaluate_pass_at_k needs a `{column}` column; the dataset has {dataset.column_names}.")
    prompts, answers = list(dataset["prompt"]), list(dataset["answer"])
    if not prompts:
        raise ValueError("evaluate_pass_at_k got an empty dataset.")
    # Sample i of problem p sits at index p * num_samples + i.
    repeated = [prompt for prompt in prompts for _ in range(num_samples)]

    def sample():
        return generate_completions(
            model, tokenizer, repeated, max_new_tokens, batch_size=batch_size, do_sample=True, temperature=temperature
        )

    if seed is None:
        completions = sample()
    else:
        devices = [model.device] if model.device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=model.device.type if devices else "cuda"):
            torch.manual_seed(seed)
            completions = sample()

    scores = [grade_answer(text, answers[index // num_samples]) or 0.0 for index, text in enumerate(completions)]
    correct = [int(sum(scores[p * num_samples : (p + 1) * num_samples])) for p in range(len(prompts))]
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in completions]
    return {
        "mean_accuracy": sum(scores) / len(scores),
        "pass_at_k": {
            k: sum(pass_at_k(num_samples, c, k) for c in correct) / len(correct) for k in range(1, num_samples + 1)
        },
        "mean_completion_tokens": sum(lengths) / len(lengths),
        "num_problems": len(prompts),
        "num_samples": num_samples,
    }
