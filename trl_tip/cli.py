"""
The `trl-tip` command.

    trl-tip eval --model Qwen/Qwen3-1.7B --dataset math500 aime24 aime25 --n 16 --backend vllm
    trl-tip eval --compare eval_results/grpo eval_results/ace --output_dir eval_results

`python -m trl_tip.cli ...` runs the same command without the console script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .evaluation import BENCHMARKS, BUILTIN, LEVEL_COLUMN


def _slug(name: str) -> str:
    return name.replace("/", "__")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"enable_thinking\": false}'")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `trl-tip eval`."""
    _add_data_arguments(parser)
    _add_sampling_arguments(parser)
    _add_backend_arguments(parser)
    _add_output_arguments(parser)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and the benchmarks."""
    names = ", ".join([BUILTIN, *BENCHMARKS])
    parser.add_argument(
        "--model", default=None, help="Model path or Hub id (a saved checkpoint works). Required unless --compare."
    )
    parser.add_argument(
        "--dataset",
        nargs="+",
        default=["math500"],
        help=f"One or more benchmarks: {names}, or a Hub dataset id (owner/name). Default: math500.",
    )
    parser.add_argument("--split", default=None, help="Split to read (default: the benchmark's; `test` for a Hub id).")
    parser.add_argument("--dataset_config", default=None, help="Dataset configuration name (Hub ids).")
    parser.add_argument("--problem_column", default=None, help="Column with the problem (default: `problem`).")
    parser.add_argument("--answer_column", default=None, help="Column with the final answer (default: `answer`).")
    parser.add_argument(
        "--prompt_template",
        default=None,
        help="The user turn, with {problem} for the problem statement. Default: the problem followed by 'Please "
        "reason step by step, and put your final answer within \\boxed{}.' ({problem} alone for the built-in task).",
    )
    parser.add_argument("--num_problems", type=_positive_int, default=None, help="Evaluate the first N problems only.")


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """How many completions per problem, and how they are sampled."""
    parser.add_argument(
        "--n", type=_positive_int, default=None, help="Completions sampled per problem (default: 16; 1 with --greedy)."
    )
    parser.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=None,
        help="Sampling temperature (default: 0.6); 0 means greedy decoding, as --greedy.",
    )
    parser.add_argument(
        "--greedy",
        action="store_true",
        help="Greedy decoding: one deterministic completion per problem (temperature 0, no top-p/top-k).",
    )
    parser.add_argument(
        "--top_p", type=_unit_interval, default=None, help="Nucleus sampling threshold in (0, 1] (default: 0.95)."
    )
    parser.add_argument(
        "--top_k", type=_non_negative_int, default=0, help="Top-k filtering; 0 turns it off (default: 0)."
    )
    parser.add_argument(
        "--max_new_tokens",
        type=_positive_int,
        default=None,
        help="Completion budget (default: 32768 for the math benchmarks, 32 for the built-in task).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Sampling seed (default: 0).")


def _add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """The generation backend, the chat template, and how the model is loaded and run."""
    parser.add_argument(
        "--backend", choices=["transformers", "vllm"], default="transformers", help="Generation backend."
    )
    parser.add_argument(
        "--chat_template_kwargs",
        type=_json_object,
        default=None,
        help="JSON object passed to the chat template, e.g. '{\"enable_thinking\": false}'.",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="Model dtype (default: auto).",
    )
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow custom model code from the Hub.")
    parser.add_argument(
        "--batch_size", type=_positive_int, default=64, help="Sequences per generate call (transformers backend)."
    )
    parser.add_argument(
        "--tensor_parallel_size", type=_positive_int, default=1, help="GPUs per vLLM engine (vllm backend)."
    )
    parser.add_argument(
        "--gpu_memory_utilization",
        type=_unit_interval,
        default=0.9,
        help="GPU memory share vLLM may take, in (0, 1] (vllm backend).",
    )
    parser.add_argument(
        "--max_model_len", type=_positive_int, default=None, help="vLLM context length (vllm backend)."
    )
    parser.add_argument(
        "--enforce_eager",
        action="store_true",
        help="Run the vLLM engine eagerly, without compiling it (CUDA graphs on a GPU, torch.compile on vLLM's CPU "
        "build): a faster start, possibly slower generation (vllm backend).",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where results go, and the comparison of finished runs."""
    parser.add_argument(
        "--output_dir",
        default="eval_results",
        help="Where to write <dataset>.jsonl (one record per problem), summary.json and the pass@k plot "
        "pass_at_k.png (default: eval_results).",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="RUN",
        help="Sample nothing: overlay two or more finished runs (their --output_dir, or their summary.json) in "
        "<output_dir>/compare_pass_at_k.png (and compare_<dataset>_levels.png), e.g. --compare runs/grpo runs/ace.",
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        default=None,
        help="Legend labels of the --compare runs (default: their directory names).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-tip", description="trl_tip command-line tools. `trl-tip <command> --help` for a command's options."
    )
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    evaluate = commands.add_parser(
        "eval",
        help="Sample n completions per problem and report mean@n, pass@1..n and mean completion tokens.",
        description="Sample n completions per problem of a math benchmark, grade them with math-verify (last "
        "\\boxed{} or 'Answer:' line), and report accuracy mean@n, unbiased pass@k for k = 1..n and the mean "
        "completion length in tokens. Per-problem results go to <output_dir>/<dataset>.jsonl, the summary to "
        "<output_dir>/summary.json, a pass@k-against-k plot to <output_dir>/pass_at_k.png (and accuracy per level "
        "to <dataset>_levels.png when the dataset has a `level` column). --compare overlays finished runs.",
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(eval_parser=evaluate)  # for usage errors found after parsing (validate_eval_arguments)
    return parser


def _looks_like_a_path(name: str) -> bool:
    # A Hub id is `name` or `owner/name`; anything else (absolute, relative, home, deeper) names a local directory.
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def validate_eval_arguments(
    args: argparse.Namespace, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """
    Resolve the sampling defaults and check what argparse cannot: greedy decoding (`--greedy`, or `--temperature 0`)
    draws one completion per problem, and a model given as a local path must exist. Errors go through
    `parser.error` (usage and a message, exit status 2) when a parser is given, else raise `ValueError`; either way
    before anything is loaded. Running it twice changes nothing.
    """

    def error(message: str):
        if parser is not None:
            parser.error(message)
        raise ValueError(message)

    if args.temperature == 0 and not args.greedy:
        args.greedy = True
    if args.greedy:
        if args.temperature not in (None, 0):
            error(f"--greedy decodes at temperature 0; drop --temperature {args.temperature}.")
        if args.top_p not in (None, 1.0) or args.top_k:
            error("--greedy takes the most likely token at every step; drop --top_p/--top_k.")
        if args.n not in (None, 1):
            error(
                f"greedy decoding gives one deterministic completion per problem, so --n {args.n} would repeat it "
                f"{args.n} times; drop --n (or sample with --temperature > 0)."
            )
        args.temperature, args.top_p, args.n = 0.0, 1.0, 1
    else:
        args.temperature = 0.6 if args.temperature is None else args.temperature
        args.top_p = 0.95 if args.top_p is None else args.top_p
        args.n = 16 if args.n is None else args.n
    model = os.path.expanduser(args.model)
    if not os.path.isdir(model):
        if os.path.exists(model):
            error(f"--model {args.model} is a file; pass the directory a model was saved to.")
        if _looks_like_a_path(args.model):
            error(f"--model {args.model}: no such directory. Pass a saved model's directory or a Hub id.")
    else:
        args.model = model
    return args


def _format_summary(name: str, summary: dict) -> str:
    n = summary["num_samples"]
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= n} | {n})
    passes = "  ".join(f"pass@{k} {100 * summary['pass_at_k'][k]:.1f}" for k in ks)
    return (
        f"{name}: {summary['num_problems']} problems × {n} samples  mean@{n} {100 * summary['mean_accuracy']:.1f}  "
        f"{passes}  tokens {summary['mean_completion_tokens']:.1f}"
        + (f"  ({summary['num_ungradable']} ungradable gold answers)" if summary["num_ungradable"] else "")
    )


def _format_levels(summary: dict) -> list[str]:
    """One line per difficulty level of a summary with `by_level` (none without)."""
    lines = []
    for level, part in summary.get("by_level", {}).items():
        n = part["num_samples"]
        lines.append(
            f"  level {level}: {part['num_problems']} problems  mean@{n} {100 * part['mean_accuracy']:.1f}  "
            f"pass@{n} {100 * part['pass_at_k'][n]:.1f}"
        )
    return lines


def run_eval(args: argparse.Namespace) -> dict:
    """Run `trl-tip eval` with parsed arguments; returns the summary written to `summary.json`."""
    args = validate_eval_arguments(args)
    from transformers import AutoTokenizer

    datasets = _load_eval_datasets(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}
    results = {}
    model = None  # loaded once, on the first dataset
    for name, dataset in datasets.items():
        model, summary, problems = _evaluate_benchmark(args, name, dataset, model, tokenizer, sampling)
        path = _write_problems(args.output_dir, name, problems)
        results[name] = summary
        print(_format_summary(name, summary), flush=True)
        for line in _format_levels(summary):
            print(line, flush=True)
        print(f"  per-problem results: {path}", flush=True)
    report = {"model": args.model, "backend": args.backend, "num_samples": args.n, **sampling, "results": results}
    if model is not None:
        # What the numbers were computed in: vLLM's "auto" runs a float32 checkpoint in half precision, transformers'
        # keeps float32.
        report["model_dtype"] = _model_dtype(model)
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as file:
        json.dump(report, file, indent=2)
    _write_plots(report, args.output_dir)
    return report


def _load_eval_datasets(args: argparse.Namespace) -> dict:
    """Every `--dataset`, by name, cut to `--num_problems` (with a note where a benchmark has fewer)."""
    from .evaluation import load_benchmark

    datasets = {
        name: load_benchmark(
            name,
            num_problems=args.num_problems,
            split=args.split,
            problem_column=args.problem_column,
            answer_column=args.answer_column,
            config=args.dataset_config,
            prompt_template=args.prompt_template,
        )
        for name in args.dataset
    }
    if args.num_problems is not None:
        for name, dataset in datasets.items():
            if len(dataset) < args.num_problems:
                print(
                    f"{name} has {len(dataset)} problems, fewer than --num_problems {args.num_problems}: evaluating "
                    f"all {len(dataset)}.",
                    flush=True,
                )
    return datasets


def _evaluate_benchmark(args: argparse.Namespace, name: str, dataset, model, tokenizer, sampling: dict):
    """
    Sample and grade one benchmark with the chosen backend, loading the model if `model` is `None`. Returns the model,
    the summary (with `max_new_tokens`, `seconds` and, where the benchmark has levels, `by_level`) and the problems.
    """
    from .evaluation import (
        default_max_new_tokens,
        evaluate_pass_at_k,
        evaluate_pass_at_k_vllm,
        load_vllm_engine,
        summarize_by,
    )

    max_new_tokens = args.max_new_tokens or default_max_new_tokens(name)
    started = time.perf_counter()
    if args.backend == "vllm":
        if model is None:
            model = load_vllm_engine(
                args.model,
                seed=args.seed,
                tensor_parallel_size=args.tensor_parallel_size,
                gpu_memory_utilization=args.gpu_memory_utilization,
                dtype=args.dtype,
                max_model_len=args.max_model_len,
                trust_remote_code=args.trust_remote_code,
                enforce_eager=args.enforce_eager,
            )
        summary, problems = evaluate_pass_at_k_vllm(
            model,
            tokenizer,
            dataset,
            num_samples=args.n,
            max_new_tokens=max_new_tokens,
            chat_template_kwargs=args.chat_template_kwargs,
            return_problems=True,
            **sampling,
        )
    else:
        if model is None:
            model = _load_model(args)
        summary, problems = evaluate_pass_at_k(
            model,
            tokenizer,
            dataset,
            num_samples=args.n,
            max_new_tokens=max_new_tokens,
            batch_size=args.batch_size,
            chat_template_kwargs=args.chat_template_kwargs,
            return_problems=True,
            **sampling,
        )
    summary = {**summary, "max_new_tokens": max_new_tokens, "seconds": time.perf_counter() - started}
    if problems and LEVEL_COLUMN in problems[0]:
        summary["by_level"] = summarize_by(problems, LEVEL_COLUMN, args.n)
    return model, summary, problems


def _write_problems(output_dir: str, name: str, problems: list[dict]) -> str:
    """Write one benchmark's per-problem records as JSONL; returns the path."""
    path = os.path.join(output_dir, f"{_slug(name)}.jsonl")
    # Created with the first result, so a run that fails before (a missing backend, a bad model) leaves nothing.
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        for problem in problems:
            file.write(json.dumps(problem, ensure_ascii=False, default=str) + "\n")
    return path


def _write_plots(report: dict, output_dir: str) -> None:
    from .eval_plots import write_run_plots

    try:
        paths = write_run_plots(report, output_dir)
    except ImportError as error:
        # The numbers are written; only the picture needs the optional dependency.
        print(f"No plot written: {error}", flush=True)
        return
    print(f"  plots: {', '.join(str(path) for path in paths)}", flush=True)


def run_compare(args: argparse.Namespace) -> list:
    """Run `trl-tip eval --compare`: overlay finished runs' summaries; returns the PNGs written."""
    from .eval_plots import compare_runs

    paths = compare_runs(args.compare, args.output_dir, labels=args.labels)
    for path in paths:
        print(f"comparison: {path}", flush=True)
    return paths


def _model_dtype(model) -> str:
    dtype = model.llm_engine.model_config.dtype if hasattr(model, "llm_engine") else model.dtype
    return str(dtype).removeprefix("torch.")


def _load_model(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "eval":
        eval_parser = args.eval_parser
        if args.compare is not None:
            # Everything but --labels and --output_dir configures sampling, which --compare does not do.
            given = [
                f"--{name}"
                for name, value in vars(args).items()
                if name not in ("command", "eval_parser", "compare", "labels", "output_dir")
                and value != eval_parser.get_default(name)
            ]
            if given:
                eval_parser.error(
                    f"--compare reads finished runs and samples nothing: drop {' '.join(given)} (or run the "
                    "evaluation separately)."
                )
            if len(args.compare) < 2:
                eval_parser.error(f"--compare needs two or more runs to overlay, got {len(args.compare)}.")
            if args.labels is not None and len(args.labels) != len(args.compare):
                eval_parser.error(
                    f"--labels needs one label per --compare run: {len(args.labels)} for {len(args.compare)}."
                )
            try:
                run_compare(args)
            except (FileNotFoundError, ValueError, ImportError) as error:
                eval_parser.error(str(error))
            return 0
        if args.model is None:
            eval_parser.error("the following arguments are required: --model (or --compare RUN RUN to overlay runs)")
        if args.labels is not None:
            eval_parser.error("--labels names --compare runs; it needs --compare.")
        run_eval(validate_eval_arguments(args, eval_parser))
    return 0


if __name__ == "__main__":
    sys.exit(main())
