"""
Sampling evaluation: unbiased pass@k, mean@n and completion length, graded by the math reward.

The pieces, from the bottom up:

- [`pass_at_k`]: the unbiased estimator `1 − C(n−c, k) / C(n, k)` for one problem.
- [`load_benchmark`]: a benchmark by name (`builtin`, `math500`, `aime24`, `aime25`, see `BENCHMARKS`) or by Hub id,
  as `prompt` (one user turn) and `answer` columns.
- [`evaluate_pass_at_k`] (a model in memory, transformers' `generate`) and [`evaluate_pass_at_k_vllm`] (a model path,
  `vllm.LLM` with `SamplingParams(n=...)`): sample `n` completions per problem, grade each with the math reward, and
  return mean@n, pass@1..n and mean completion tokens, optionally with every problem's samples.
- [`PassAtKCallback`]: the same metrics during training, logged through the trainer.
- [`load_metric`]: the same grading and estimator as a Hugging Face `evaluate` metric (`trl_tip/metrics`).
- `trl-tip eval` (`trl_tip.cli`) runs it from the command line and writes per-problem JSONL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
import torch
from transformers import TrainerCallback

from .rewards import grade_answer


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
# Sampling
# ---------------------------------------------------------------------------------------------------------------------


def tokenize_prompts(tokenizer, prompts: Sequence, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Conversational prompts through the chat template (generation prompt added), as token ids."""
    ids = []
    for prompt in prompts:
        if isinstance(prompt, str):
            raise TypeError(
                "Prompts must be chat messages (a list of {'role', 'content'}); wrap plain text in a user turn."
            )
        encoded = tokenizer.apply_chat_template(
            list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True, **(chat_template_kwargs or {})
        )
        ids.append(list(encoded["input_ids"]))
    return ids


def _eos_token_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    if not ids:
        raise ValueError("Neither the tokenizer nor the model's generation config names an end-of-sequence token.")
    return sorted(ids)


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 64,
) -> tuple[list[str], list[int]]:
    """
    Sample `num_samples` completions for each prompt with transformers' `generate` (from the global random state).

    Returns:
        `tuple[list[str], list[int]]`: the decoded completions, sample `i` of prompt `p` at index
        `p * num_samples + i`, and the number of tokens each one generated, its end-of-sequence token included
        (`max_new_tokens` for a completion cut at the budget).
    """
    from transformers import GenerationConfig

    eos = _eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # Temperature 0 is greedy decoding, as in vLLM (transformers would divide the logits by it).
    greedy = temperature == 0
    config = GenerationConfig(
        do_sample=not greedy,
        temperature=1.0 if greedy else temperature,
        top_p=1.0 if greedy else top_p,
        top_k=top_k,  # 0: no top-k filtering, whatever the model's generation config says
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    repeated = [ids for ids in prompt_ids for _ in range(num_samples)]
    was_training = model.training
    model.eval()
    texts, counts = [], []
    try:
        for start in range(0, len(repeated), batch_size):
            batch = repeated[start : start + batch_size]
            width = max(map(len, batch))
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=model.device)
            attention_mask = torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=model.device
            )
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            generated = output[:, width:].cpu()
            is_eos = torch.isin(generated, torch.tensor(eos))
            lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, generated.size(1)).tolist()
            rows = [row[:length] for row, length in zip(generated.tolist(), lengths, strict=True)]
            texts += tokenizer.batch_decode(rows, skip_special_tokens=True)
            counts += lengths
    finally:
        model.train(was_training)
    return texts, counts


def _import_vllm():
    try:
        from vllm import LLM, SamplingParams
    except ImportError as error:
        raise ImportError(
            "The vllm backend needs vLLM, which is not installed (or failed to import: "
            f"{error}). Install it with `pip install 'trl-tip[vllm]'` on a Linux machine with a CUDA GPU, or use "
            "--backend transformers."
        ) from error
    return LLM, SamplingParams


def load_vllm_engine(
    model_path: str,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    dtype: str = "auto",
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
    enforce_eager: bool = False,
):
    """
    A `vllm.LLM` engine for `model_path`; raises `ImportError` with install instructions when vLLM is missing.
    `dtype="auto"` is vLLM's choice, which runs a float32 checkpoint in the platform's half precision (bfloat16 on
    CPUs and recent GPUs); `enforce_eager` skips compiling the model (CUDA graphs, or torch.compile on vLLM's CPU
    build). On vLLM's CPU build the KV cache gets
    `VLLM_CPU_KVCACHE_SPACE` GiB, 1 when unset.
    """
    LLM, _ = _import_vllm()
    from ._trl_compat import vllm_runs_on_cpu

    if vllm_runs_on_cpu():
        from .vllm_cpu import ensure_cpu_kv_cache_space

        ensure_cpu_kv_cache_space()
        cpu_kwargs = {"enable_chunked_prefill": False}
    else:
        cpu_kwargs = {}
    engine_kwargs = {
        **cpu_kwargs,
        "model": model_path,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "dtype": dtype,
        "seed": seed,
        "trust_remote_code": trust_remote_code,
        "enforce_eager": enforce_eager,
    }
    if max_model_len is not None:
        engine_kwargs["max_model_len"] = max_model_len
    return LLM(**engine_kwargs)


def sample_completions_vllm(
    llm,
    prompt_ids: list[list[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> tuple[list[str], list[int]]:
    """
    Sample `num_samples` completions for each prompt with a `vllm.LLM` engine: one `generate` call on the prompts'
    token ids, prompt `p` with `SamplingParams(n=num_samples, seed=seed + p * num_samples, ...)`, so that a run is
    reproducible whatever else the engine generated before.

    Returns:
        Like [`sample_completions`]: the texts (sample `i` of prompt `p` at `p * num_samples + i`) and the generated
        token counts (vLLM's output token ids, its end-of-sequence token included).
    """
    _, SamplingParams = _import_vllm()
    params = [
        SamplingParams(
            n=num_samples,
            temperature=temperature,
            top_p=top_p,
            top_k=-1 if top_k == 0 else top_k,  # vLLM spells "no top-k" as -1
            max_tokens=max_new_tokens,
            seed=seed + p * num_samples,
        )
        for p in range(len(prompt_ids))
    ]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params=params)
    if len(outputs) != len(prompt_ids) or any(len(output.outputs) != num_samples for output in outputs):
        raise RuntimeError(
            f"vLLM returned {[len(output.outputs) for output in outputs]} completions for {len(prompt_ids)} prompts; "
            f"expected {num_samples} each."
        )
    texts = [sample.text for output in outputs for sample in output.outputs]
    counts = [len(sample.token_ids) for output in outputs for sample in output.outputs]
    return texts, counts


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


# ---------------------------------------------------------------------------------------------------------------------
# Training callback
# ---------------------------------------------------------------------------------------------------------------------


def padded_shard(num_items: int, rank: int, world_size: int) -> list[int]:
    """
    Indices of the items process `rank` evaluates: every `world_size`-th from `rank`, then the index 0 repeated until
    every process holds `ceil(num_items / world_size)`. The padding is evaluated and its results dropped (keep the
    first `len(range(rank, num_items, world_size))`): under ZeRO-3 and FSDP2 every `generate` step is a collective,
    so a process with one problem fewer would leave the others waiting in a call it never makes.
    """
    indices = list(range(rank, num_items, world_size))
    per_process = -(-num_items // world_size)
    return indices + [0] * (per_process - len(indices))


def map_over_processes(trainer, dataset, evaluate_shard: Callable) -> list:
    """
    Run `evaluate_shard(model, tokenizer, shard)` on every process with the trainer's prepared (possibly sharded)
    model, each on its [`padded_shard`] of `dataset`, and return the records of all processes, concatenated in process
    order with the padding dropped. `evaluate_shard` returns one record per row of `shard`.

    The model is unwrapped for generation as the trainer does it (`ds3_gather_for_generation=False` generates from
    ZeRO-3's partitions; under FSDP2 each rank generates with its shards), so every process must call this.
    """
    from accelerate.utils import gather_object
    from trl.models.utils import unwrap_model_for_generation

    accelerator = trainer.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    indices = padded_shard(len(dataset), rank, world)
    num_real = len(range(rank, len(dataset), world))
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    gather_weights = getattr(trainer.args, "ds3_gather_for_generation", True)
    records = []
    with unwrap_model_for_generation(
        trainer.model_wrapped, accelerator, gather_deepspeed3_params=gather_weights
    ) as model:
        if indices:
            records = list(evaluate_shard(model, tokenizer, dataset.select(indices)))[:num_real]
    return gather_object(records) if world > 1 else records


class PassAtKCallback(TrainerCallback):
    """
    Sample `num_samples` completions per problem of a dataset during training and log mean@n, pass@1..n and the mean
    completion length through the trainer (`trainer.state.log_history`, and every reporting integration).

    Runs every `eval_steps` optimiser steps and once when training ends (unless the last step was just evaluated).
    With several processes, each one samples its share of the problems and the results are gathered; the shares are
    padded to equal length (see [`padded_shard`]), so every process makes the same `generate` calls, as sharded
    models (ZeRO-3, FSDP2) need.

    Args:
        trainer ([`~transformers.Trainer`]): the trainer to evaluate the model of and to log through (any TRL or
            trl_tip trainer).
        dataset ([`~datasets.Dataset`]): problems with conversational `prompt` and gold `answer` columns.
        num_samples (`int`, *optional*, defaults to `4`): completions per problem (`n`).
        eval_steps (`int`, *optional*): steps between evaluations; defaults to `args.eval_steps` when
            `args.eval_strategy="steps"`, otherwise the evaluation runs only at the end.
        at_end (`bool`, *optional*, defaults to `True`): evaluate when training ends.
        max_new_tokens (`int`, *optional*): completion budget; defaults to `args.max_completion_length` (TRL's
            configs), else 256.
        temperature (`float`, *optional*): defaults to `args.temperature` when the config has one, else 1.0.
        top_p (`float`, *optional*, defaults to `1.0`), top_k (`int`, *optional*, defaults to `0`): as in
            [`evaluate_pass_at_k`].
        batch_size (`int`, *optional*, defaults to `64`): sequences per `generate` call.
        seed (`int`, *optional*, defaults to `0`): sampling seed (plus the process index); the global random state
            of training is left untouched.
        prefix (`str`, *optional*, defaults to `"pass_at_k"`): logged names are `{prefix}/mean_accuracy`,
            `{prefix}/pass@{k}` and `{prefix}/mean_completion_tokens`.

    Example:

    ```python
    trainer = GRPOTrainer(...)
    trainer.add_callback(PassAtKCallback(trainer, dataset["test"], num_samples=8, eval_steps=50))
    trainer.train()
    ```
    """

    def __init__(
        self,
        trainer,
        dataset,
        num_samples: int = 4,
        eval_steps: int | None = None,
        at_end: bool = True,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float = 1.0,
        top_k: int = 0,
        batch_size: int = 64,
        seed: int = 0,
        prefix: str = "pass_at_k",
    ):
        _check_dataset(dataset, num_samples)
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1 or None, got {eval_steps}.")
        self.trainer = trainer
        self.dataset = dataset
        self.num_samples = num_samples
        args = trainer.args
        if eval_steps is None and str(getattr(args, "eval_strategy", "no")).endswith("steps"):
            eval_steps = int(args.eval_steps) if args.eval_steps and args.eval_steps >= 1 else None
        self.eval_steps = eval_steps
        self.at_end = at_end
        self.max_new_tokens = max_new_tokens or getattr(args, "max_completion_length", None) or 256
        self.temperature = temperature if temperature is not None else getattr(args, "temperature", 1.0)
        self.top_p, self.top_k, self.batch_size, self.seed, self.prefix = top_p, top_k, batch_size, seed, prefix
        self.history: list[tuple[int, dict]] = []  # (step, summary) of every evaluation, on every process
        self._last_step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            # Logging resets `control.should_log`; the trainer's own log of this step must still happen.
            should_log = control.should_log
            self.evaluate(state.global_step)
            control.should_log = should_log

    def on_train_end(self, args, state, control, **kwargs):
        if self.at_end and self._last_step != state.global_step:
            self.evaluate(state.global_step)

    def evaluate(self, step: int) -> dict:
        """Evaluate now and log the metrics at `step`; returns the summary."""
        trainer = self.trainer
        rank = trainer.accelerator.process_index

        def evaluate_shard(model, tokenizer, shard):
            _, problems = evaluate_pass_at_k(
                model,
                tokenizer,
                shard,
                num_samples=self.num_samples,
                max_new_tokens=self.max_new_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                batch_size=self.batch_size,
                seed=self.seed + rank,
                chat_template_kwargs=getattr(trainer.args, "chat_template_kwargs", None),
                return_problems=True,
            )
            return [{key: problem[key] for key in ("scores", "completion_tokens", "pass_at_k", "gradable")}
                    for problem in problems]

        problems = map_over_processes(trainer, self.dataset, evaluate_shard)
        summary = summarize(problems, self.num_samples)
        # `transformers.Trainer.log`, not the TRL trainers' override, which would fold (and reset) the training
        # metrics accumulated since the last logging step into this entry.
        from transformers import Trainer

        Trainer.log(trainer, metrics_for_logging(summary, self.prefix))
        self.history.append((step, summary))
        self._last_step = step
        return summary


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
