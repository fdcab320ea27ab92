"""
Sampling evaluation: unbiased pass@k, mean@n and completion length, graded by the math reward.

The pieces, from the bottom up:

- [`pass_at_k`]: the unbiased estimator `1 − C(n−c, k) / C(n, k)` for one problem.
- [`load_benchmark`]: a benchmark by name (`builtin`, `math500`, `aime24`, `aime25`, see `BENCHMARKS`) or by Hub id,
  as `prompt` (one user turn) and `answer` columns.
- [`evaluate_pass_at_k`] (a model in memory, transformers' `generate`) and [`evaluate_pass_at_k_vllm`] (a model path,
  `vllm.LLM` with `SamplingParams(n=...)`): sample `n` completions per problem (`trl_tip.sampling`), grade each with
  the math reward, and return mean@n, pass@1..n and mean completion tokens, optionally with every problem's samples.
- [`PassAtKCallback`] (`trl_tip.eval_callback`): the same metrics during training, logged through the trainer.
- [`load_metric`]: the same grading and estimator as a Hugging Face `evaluate` metric (`trl_tip/metrics`).
- `trl-tip eval` (`trl_tip.cli`) runs it from the command line and writes per-problem JSONL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .rewards import grade_answer
from .sampling import load_vllm_engine, sample_completions, sample_completions_vllm, tokenize_prompts


# The instruction appended to competition-math problems, so that the final answer lands in a \boxed{} the math reward
# reads (the one Qwen and DeepSeek-R1 evaluate MATH-500 and AIME with).
MATH_PROMPT_TEMPLATE = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."


@dataclass(frozen=True)
class Benchmark:
    """
    Where a benchmark lives on the Hub and how to read it.

    Args:
        path (`str`): Hub dataset id.
        split (`str`): split that holds the problems.
        problem_column (`str`): column with the problem statement.
        answer_column (`str`): column with the final answer (graded with math-verify).
        config (`str` or `None`): dataset configuration name, if any.
        prompt_template (`str`): the user turn, with `{problem}` standing for the problem statement.
        max_new_tokens (`int`): default completion budget.
    """

    path: str
    split: str
    problem_column: str = "problem"
    answer_column: str = "answer"
    config: str | None = None
    prompt_template: str = MATH_PROMPT_TEMPLATE
    max_new_tokens: int = 32768


# Benchmarks by name. The AIME ids are those lighteval's `aime24` / `aime25` tasks read (30 problems each, `problem`
# and `answer` columns, a single `train` split); MATH-500 is the 500-problem test subset of MATH.
BENCHMARKS = {
    "math500": Benchmark("HuggingFaceH4/MATH-500", split="test"),
    "aime24": Benchmark("HuggingFaceH4/aime_2024", split="train"),
    "aime25": Benchmark("yentinglin/aime_2025", split="train"),
}
# The built-in task's test split (`trl_tip.tasks.build_arithmetic_dataset()['test']`), prompts as they are.
BUILTIN = "builtin"
BUILTIN_MAX_NEW_TOKENS = 32
# A benchmark column kept beside prompt / answer / problem when the dataset has it (MATH-500's difficulty, 1-5).
LEVEL_COLUMN = "level"


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


# ---------------------------------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------------------------------


def load_dataset(*args, **kwargs):
    """`datasets.load_dataset`, imported when a Hub benchmark is first read."""
    import datasets

    return datasets.load_dataset(*args, **kwargs)


def resolve_benchmark(
    name: str,
    split: str | None = None,
    problem_column: str | None = None,
    answer_column: str | None = None,
    config: str | None = None,
    prompt_template: str | None = None,
) -> Benchmark:
    """
    The [`Benchmark`] for a name of `BENCHMARKS` or a Hub dataset id, with any of its fields overridden. A Hub id not
    in the table reads the `test` split, `problem` and `answer` columns and the math prompt unless told otherwise.
    """
    if name == BUILTIN:
        raise ValueError("The built-in task is not a Hub benchmark; load it with load_benchmark('builtin').")
    if name in BENCHMARKS:
        base = BENCHMARKS[name]
    elif "/" in name:
        base = Benchmark(name, split="test")
    else:
        raise ValueError(
            f"Unknown benchmark {name!r}: use {BUILTIN!r}, one of {', '.join(BENCHMARKS)}, or a Hub dataset id "
            "(owner/name) with --problem_column / --answer_column / --split."
        )
    overrides = {
        "split": split,
        "problem_column": problem_column,
        "answer_column": answer_column,
        "config": config,
        "prompt_template": prompt_template,
    }
    values = {**base.__dict__, **{key: value for key, value in overrides.items() if value is not None}}
    benchmark = Benchmark(**values)
    if "{problem}" not in benchmark.prompt_template:
        raise ValueError(f"The prompt template must contain {{problem}}, got {benchmark.prompt_template!r}.")
    return benchmark


def load_benchmark(
    name: str,
    num_problems: int | None = None,
    split: str | None = None,
    problem_column: str | None = None,
    answer_column: str | None = None,
    config: str | None = None,
    prompt_template: str | None = None,
):
    """
    A benchmark as a [`~datasets.Dataset`] with `prompt` (one user turn: the problem in the prompt template), `answer`
    and `problem` columns (and `level` when the Hub dataset has one, as MATH-500 does), ready for
    [`evaluate_pass_at_k`].

    Args:
        name (`str`): `"builtin"` (the built-in task's 300 test problems), a name of `BENCHMARKS` (`"math500"`,
            `"aime24"`, `"aime25"`) or a Hub dataset id.
        num_problems (`int`, *optional*): keep the first N problems only.
        split, problem_column, answer_column, config, prompt_template: override the table's entry (Hub only; the
            built-in task accepts `prompt_template` alone).
    """
    if num_problems is not None and num_problems < 1:
        raise ValueError(f"num_problems must be >= 1, got {num_problems}.")
    from datasets import Dataset

    if name == BUILTIN:
        if any(value is not None for value in (split, problem_column, answer_column, config)):
            raise ValueError(
                "The built-in task has fixed columns and split; drop --split/--*_column/--dataset_config."
            )
        from .tasks.arithmetic import build_arithmetic_dataset

        dataset = build_arithmetic_dataset()["test"]
        dataset = dataset.map(lambda row: {"problem": row["prompt"][-1]["content"]}, remove_columns=["completion"])
        template = prompt_template or "{problem}"
        if template != "{problem}":
            dataset = dataset.map(
                lambda row: {"prompt": [{"role": "user", "content": template.format(problem=row["problem"])}]}
            )
    else:
        benchmark = resolve_benchmark(name, split, problem_column, answer_column, config, prompt_template)
        dataset = load_dataset(benchmark.path, benchmark.config, split=benchmark.split)
        missing = [c for c in (benchmark.problem_column, benchmark.answer_column) if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"{benchmark.path} (split {benchmark.split!r}) has no column {missing}; its columns are "
                f"{dataset.column_names}. Name them with --problem_column / --answer_column."
            )
        problems = list(dataset[benchmark.problem_column])
        dataset = Dataset.from_dict(
            {
                "prompt": [
                    [{"role": "user", "content": benchmark.prompt_template.format(problem=p)}] for p in problems
                ],
                # Gold answers as text (AIME stores some as integers); math-verify parses them.
                "answer": [str(answer) for answer in dataset[benchmark.answer_column]],
                "problem": problems,
                # MATH's difficulty (1-5): `trl-tip eval` reports and plots accuracy per level.
                **({LEVEL_COLUMN: list(dataset[LEVEL_COLUMN])} if LEVEL_COLUMN in dataset.column_names else {}),
            }
        )
    if num_problems is not None:
        dataset = dataset.select(range(min(num_problems, len(dataset))))
    return dataset


def default_max_new_tokens(name: str) -> int:
    """The completion budget a benchmark is evaluated with unless told otherwise."""
    if name == BUILTIN:
        return BUILTIN_MAX_NEW_TOKENS
    return BENCHMARKS[name].max_new_tokens if name in BENCHMARKS else Benchmark(name, "test").max_new_tokens


# ---------------------------------------------------------------------------------------------------------------------
# Grading and aggregation
# ---------------------------------------------------------------------------------------------------------------------


def grade_problems(
    answers: Sequence, completions: Sequence[str], token_counts: Sequence[int] | None, num_samples: int
) -> list[dict]:
    """
    Grade `num_samples` completions per problem (problem `p`'s at `p * num_samples ...`) with the math reward.

    Args:
        answers (`Sequence`): one gold answer per problem.
        completions (`Sequence[str]`): `len(answers) * num_samples` completion texts.
        token_counts (`Sequence[int]` or `None`): tokens generated per completion; `None` for completions whose
            length is unknown (the records then have no `completion_tokens`).
        num_samples (`int`): completions per problem (`n`).

    Returns:
        `list[dict]`: one record per problem: `answer`, `completions`, `scores` (1.0 / 0.0 each), `completion_tokens`,
        `num_correct`, `gradable` (`False` when the gold answer does not parse; every sample then scores 0) and
        `pass_at_k` (`{k: estimate}` for k = 1..n).
    """
    if len(completions) != len(answers) * num_samples or (
        token_counts is not None and len(token_counts) != len(completions)
    ):
        raise ValueError(
            f"Expected {len(answers)} × {num_samples} completions and token counts, got {len(completions)} and "
            f"{'no' if token_counts is None else len(token_counts)}."
        )
    problems = []
    for p, gold in enumerate(answers):
        texts = list(completions[p * num_samples : (p + 1) * num_samples])
        grades = [grade_answer(text, gold) for text in texts]
        scores = [grade or 0.0 for grade in grades]
        correct = int(sum(scores))
        record = {"answer": gold, "completions": texts, "scores": scores}
        if token_counts is not None:
            record["completion_tokens"] = [int(n) for n in token_counts[p * num_samples : (p + 1) * num_samples]]
        record.update(
            {
                "num_correct": correct,
                "gradable": all(grade is not None for grade in grades),
                "pass_at_k": {k: pass_at_k(num_samples, correct, k) for k in range(1, num_samples + 1)},
            }
        )
        problems.append(record)
    return problems


def summarize(problems: Sequence[dict], num_samples: int) -> dict:
    """
    Aggregate [`grade_problems`] records: `mean_accuracy` (mean@n, accuracy over all samples), `pass_at_k`
    (`{k: mean over problems}` for k = 1..n), `mean_completion_tokens` (when the records count tokens),
    `num_problems`, `num_samples` and `num_ungradable` (problems whose gold answer does not parse, counted as wrong).
    """
    if not problems:
        raise ValueError("Nothing to summarise: no problems were evaluated.")
    scores = [score for problem in problems for score in problem["scores"]]
    summary = {
        "mean_accuracy": sum(scores) / len(scores),
        "pass_at_k": {
            k: sum(problem["pass_at_k"][k] for problem in problems) / len(problems) for k in range(1, num_samples + 1)
        },
    }
    if all("completion_tokens" in problem for problem in problems):
        tokens = [count for problem in problems for count in problem["completion_tokens"]]
        summary["mean_completion_tokens"] = sum(tokens) / len(tokens)
    summary.update(
        {
            "num_problems": len(problems),
            "num_samples": num_samples,
            "num_ungradable": sum(not problem["gradable"] for problem in problems),
        }
    )
    return summary


def _natural_key(text: str) -> tuple:
    # "Level 2" before "Level 10", numbers before words.
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part)


def summarize_by(problems: Sequence[dict], column: str, num_samples: int) -> dict[str, dict]:
    """
    [`summarize`] per value of a record's `column` (e.g. MATH's `level`): `{str(value): summary}`, values in natural
    order ("2" before "10").
    """
    missing = sum(column not in problem for problem in problems)
    if missing:
        raise ValueError(f"{missing} of {len(problems)} records have no `{column}` to group by.")
    groups: dict[str, list[dict]] = {}
    for problem in problems:
        groups.setdefault(str(problem[column]), []).append(problem)
    return {key: summarize(groups[key], num_samples) for key in sorted(groups, key=_natural_key)}


def _check_dataset(dataset, num_samples: int) -> tuple[list, list]:
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    for column in ("prompt", "answer"):
        if column not in dataset.column_names:
            raise ValueError(f"The evaluation needs a `{column}` column; the dataset has {dataset.column_names}.")
    prompts, answers = list(dataset["prompt"]), list(dataset["answer"])
    if not prompts:
        raise ValueError("The evaluation got an empty dataset.")
    return prompts, answers


def _attach_rows(problems: list[dict], dataset) -> list[dict]:
    # Each record starts with the problem's row (index, prompt, and any other column such as `problem`).
    rows = dataset.to_list()
    return [{"index": i, **{k: v for k, v in row.items() if k != "answer"}, **problem} for i, (row, problem) in
            enumerate(zip(rows, problems, strict=True))]


def evaluate_pass_at_k(
    model,
    tokenizer,
    dataset,
    num_samples: int = 8,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    batch_size: int = 512,
    seed: int | None = 0,
    top_p: float = 1.0,
    top_k: int = 0,
    chat_template_kwargs: dict | None = None,
    return_problems: bool = False,
) -> dict | tuple[dict, list[dict]]:
    """
    Sample `num_samples` completions per problem of a split with transformers and grade them with the math reward.

    Args:
        model ([`~transformers.PreTrainedModel`]): the model to sample from.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): its tokenizer, with a chat template.
        dataset ([`~datasets.Dataset`]): a split with conversational `prompt` and gold `answer` columns.
        num_samples (`int`, *optional*, defaults to `8`): completions per problem (`n`).
        max_new_tokens (`int`, *optional*, defaults to `32`): length limit of a completion.
        temperature (`float`, *optional*, defaults to `1.0`): sampling temperature.
        batch_size (`int`, *optional*, defaults to `512`): sequences per `generate` call.
        seed (`int` or `None`, *optional*, defaults to `0`): seed of the sampling, which then leaves the global
            random state untouched; `None` samples from (and advances) the global random state.
        top_p (`float`, *optional*, defaults to `1.0`): nucleus sampling threshold (`1.0`: off).
        top_k (`int`, *optional*, defaults to `0`): top-k filtering (`0`: off, whatever the model's generation config
            says).
        chat_template_kwargs (`dict`, *optional*): extra arguments of the chat template (e.g. `enable_thinking`).
        return_problems (`bool`, *optional*, defaults to `False`): also return every problem's record.

    Returns:
        `dict`: `mean_accuracy` (mean@n: accuracy averaged over all samples), `pass_at_k` (`{k: pass@k}` for
        `k = 1..n`, each the mean over problems of the unbiased estimate), `mean_completion_tokens` (tokens generated
        per completion, its end-of-sequence token included), `num_problems`, `num_samples` and `num_ungradable`. With
        `return_problems=True`, a tuple of that and the per-problem records of [`grade_problems`], each led by the
        problem's `index` and dataset columns.
    """
    prompts, answers = _check_dataset(dataset, num_samples)
    prompt_ids = tokenize_prompts(tokenizer, prompts, chat_template_kwargs)

    def sample():
        return sample_completions(
            model, tokenizer, prompt_ids, num_samples, max_new_tokens, temperature, top_p, top_k, batch_size
        )

    if seed is None:
        completions, counts = sample()
    else:
        devices = [model.device] if model.device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=model.device.type if devices else "cuda"):
            torch.manual_seed(seed)
            completions, counts = sample()

    problems = grade_problems(answers, completions, counts, num_samples)
    summary = summarize(problems, num_samples)
    return (summary, _attach_rows(problems, dataset)) if return_problems else summary


def evaluate_pass_at_k_vllm(
    llm,
    tokenizer,
    dataset,
    num_samples: int = 8,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    top_p: float = 1.0,
    top_k: int = 0,
    chat_template_kwargs: dict | None = None,
    return_problems: bool = False,
    **engine_kwargs,
) -> dict | tuple[dict, list[dict]]:
    """
    [`evaluate_pass_at_k`] with vLLM. `llm` is a `vllm.LLM` engine, or a model path from which one is built with
    `engine_kwargs` (`tensor_parallel_size`, `gpu_memory_utilization`, `dtype`, `max_model_len`,
    `trust_remote_code`, `enforce_eager`; see [`load_vllm_engine`]). Every problem's `num_samples` completions come
    from one `SamplingParams(n=num_samples)` request. Same return value. Raises `ImportError` with install
    instructions when vLLM is missing.
    """
    prompts, answers = _check_dataset(dataset, num_samples)
    if isinstance(llm, str):
        llm = load_vllm_engine(llm, seed=seed, **engine_kwargs)
    elif engine_kwargs:
        raise TypeError(f"Engine arguments {sorted(engine_kwargs)} only apply when `llm` is a model path.")
    prompt_ids = tokenize_prompts(tokenizer, prompts, chat_template_kwargs)
    completions, counts = sample_completions_vllm(
        llm, prompt_ids, num_samples, max_new_tokens, temperature, top_p, top_k, seed
    )
    problems = grade_problems(answers, completions, counts, num_samples)
    summary = summarize(problems, num_samples)
    return (summary, _attach_rows(problems, dataset)) if return_problems else summary


def metrics_for_logging(summary: dict, prefix: str) -> dict[str, float]:
    """Flatten a summary into `{prefix}/mean_accuracy`, `{prefix}/pass@k` and `{prefix}/mean_completion_tokens`."""
    metrics = {f"{prefix}/mean_accuracy": summary["mean_accuracy"]}
    metrics.update({f"{prefix}/pass@{k}": value for k, value in summary["pass_at_k"].items()})
    metrics[f"{prefix}/mean_completion_tokens"] = summary["mean_completion_tokens"]
    return metrics


def load_metric(**kwargs):
    """
    The `math_pass_at_k` metric of Hugging Face `evaluate`, loaded from the module shipped in `trl_tip/metrics`
    (nothing is fetched from the Hub; works with `HF_HUB_OFFLINE=1`). It grades with [`grade_problems`] and
    aggregates with [`summarize`], so it reports the numbers `trl-tip eval` reports for the same completions.

    Args:
        kwargs: passed to `evaluate.load` (e.g. `experiment_id`, `keep_in_memory`, `num_process`, `process_id`).

    Example:

    ```python
    >>> metric = load_metric()
    >>> metric.compute(predictions=[["Answer: 4", "Answer: 5"]], references=["4"], k=[1, 2])
    {'pass@1': 0.5, 'pass@2': 1.0, 'mean@n': 0.5, 'num_ungradable': 0, 'num_problems': 1, 'num_samples': 2}
    ```
    """
    import evaluate

    from .metrics import METRIC_PATHS

    return evaluate.load(METRIC_PATHS["math_pass_at_k"], **kwargs)


# The training callback lives in `trl_tip.eval_callback`, which imports this module; its names stay importable from here.
_CALLBACK_NAMES = ("PassAtKCallback", "map_over_processes", "padded_shard")


def __getattr__(name):
    if name in _CALLBACK_NAMES:
        from . import eval_callback

        return getattr(eval_callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BENCHMARKS",
    "BUILTIN",
    "Benchmark",
    "MATH_PROMPT_TEMPLATE",
    "PassAtKCallback",
    "evaluate_pass_at_k",
    "evaluate_pass_at_k_vllm",
    "grade_problems",
    "load_benchmark",
    "load_metric",
    "load_vllm_engine",
    "pass_at_k",
    "summarize",
    "summarize_by",
]
