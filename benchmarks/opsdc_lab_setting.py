"""
The built-in setting of `examples/opsdc.py`: a small grid on the lab task, fixed before any run, and the rule that
picks from it.

Grid (OPSDC on the lab's teacher, 200 optimiser steps x 8 prompts, one rollout each, completions <= 128 tokens,
M = 50 (the paper's refresh interval: snapshots at steps 0, 50, 100 and 150), seed 0, one torch thread):

- learning rate 3e-6, 1e-5, 3e-5, 1e-4 (constant; the lab's earlier runs used 1e-4 for 60 steps and collapsed);
- instruction v2 (the default) and v1.

Rule, stated before the grid was run: each run is measured on the lab's validation split (90 problems, 30 per level;
greedy). Among the runs whose validation accuracy after training is at most 2 points below the base model's, the
default is the one with the shortest mean completion length (ties: the smaller learning rate). If no run holds
accuracy, the default is the most conservative one, v2 at 3e-6. The test split is not used for the choice; every run
is also measured on it after training, and reported.

    python benchmarks/opsdc_lab_setting.py grid                 # the grid, then the choice, into the JSON
    python benchmarks/opsdc_lab_setting.py builtin              # `python examples/opsdc.py` as it ships, timed
    python benchmarks/opsdc_lab_setting.py render --write docs/opsdc.md   # the docs section, from the JSON (and with
                                                                          # --write docs/results.md, the results page's)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from token_selection import write_section  # noqa: E402


RESULTS = ROOT / "benchmarks" / "results" / "opsdc_lab_setting.json"
EXAMPLE = ROOT / "examples" / "opsdc.py"
LEARNING_RATES = (3e-6, 1e-5, 3e-5, 1e-4)
INSTRUCTIONS = ("v2", "v1")
FIXED = {"max_steps": 200, "per_device_train_batch_size": 8, "teacher_refresh_steps": 50, "seed": 0}
MAX_ACCURACY_DROP = 0.02
CONSERVATIVE = ("v2", 3e-6)
PARALLEL_RUNS = 2


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
    return time.perf_counter() - started


def _test_accuracy(model_dir: str) -> dict:
    """Worker: greedy accuracy and length by level of a saved model on the lab's test split (plain prompt)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "examples"))
    from opsdc import evaluate_builtin, load_lab

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    return evaluate_builtin(model, tokenizer, load_lab()["dataset"]["test"])


def _grid_point(instruction: str, learning_rate: float, work: Path) -> dict:
    name = f"{instruction}_lr{learning_rate:g}"
    out = work / name
    flags = [f"--{key}={value}" for key, value in FIXED.items()]
    command = [sys.executable, str(EXAMPLE), f"--output_dir={out}", f"--learning_rate={learning_rate}",
               f"--concise_instruction={instruction}", "--dataset_test_split=validation", *flags]
    seconds = _run(command, work / f"{name}.log")
    measured = json.loads((out / "opsdc_builtin_metrics.json").read_text())
    test = subprocess.run([sys.executable, __file__, "test-eval", str(out)], check=True, capture_output=True,
                          text=True, env=_env(), cwd=ROOT)
    print(f"{name}: done in {seconds:.0f} s", flush=True)
    return {"name": name, "instruction": instruction, "learning_rate": learning_rate, "wall_seconds": seconds,
            "validation": measured, "test_after": json.loads(test.stdout.strip().splitlines()[-1])}


def choose(runs: list[dict]) -> dict:
    """The rule of this module's docstring: the chosen run's name, and whether it holds accuracy."""
    held = [run for run in runs
            if run["validation"]["before"]["accuracy"] - run["validation"]["after"]["accuracy"]
            <= MAX_ACCURACY_DROP + 1e-9]
    if held:
        best = min(held, key=lambda run: (run["validation"]["after"]["mean_completion_tokens"], run["learning_rate"]))
        return {"name": best["name"], "holds_accuracy": True}
    instruction, learning_rate = CONSERVATIVE
    best = next(run for run in runs if run["instruction"] == instruction and run["learning_rate"] == learning_rate)
    return {"name": best["name"], "holds_accuracy": False}


def _machine() -> dict:
    import torch

    return {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "load_average": os.getloadavg()}


def run_grid(work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    points = [(instruction, lr) for instruction in INSTRUCTIONS for lr in LEARNING_RATES]
    started = time.perf_counter()
    machine = _machine()
    with ThreadPoolExecutor(PARALLEL_RUNS) as pool:
        runs = list(pool.map(lambda point: _grid_point(*point, work), points))
    base_test = subprocess.run([sys.executable, __file__, "test-eval", "base"], check=True, capture_output=True,
                               text=True, env=_env(), cwd=ROOT)
    return {
        "grid": {"learning_rates": list(LEARNING_RATES), "instructions": list(INSTRUCTIONS), **FIXED,
                 "max_completion_length": 128, "selection_split": "validation",
                 "max_accuracy_drop": MAX_ACCURACY_DROP, "conservative": list(CONSERVATIVE)},
        "runs": runs,
        "test_before": json.loads(base_test.stdout.strip().splitlines()[-1]),
        "choice": choose(runs),
        "grid_wall_seconds": time.perf_counter() - started,
        "parallel_runs": PARALLEL_RUNS,
        "machine": machine,
        "load_average_after": os.getloadavg(),
        "measured": time.strftime("%Y-%m-%d"),
    }


def run_builtin(work: Path) -> dict:
    """`python examples/opsdc.py` with no arguments but the output directory, timed end to end."""
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    seconds = _run([sys.executable, str(EXAMPLE), f"--output_dir={work / 'builtin'}"], work / "builtin.log")
    measured = json.loads((work / "builtin" / "opsdc_builtin_metrics.json").read_text())
    return {"command": "python examples/opsdc.py", "wall_seconds": seconds, "results": measured,
            "load_average_before": load_before, "load_average_after": os.getloadavg()}


# --- rendering -------------------------------------------------------------------------------------------------------


def _lr(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _cells(measured: dict) -> str:
    levels = sorted(measured["levels"], key=int)
    cells = [_pct(measured["accuracy"])] + [_pct(measured["levels"][lv]["accuracy"]) for lv in levels]
    cells += [f"{measured['mean_completion_tokens']:.1f}"]
    cells += [f"{measured['levels'][lv]['mean_completion_tokens']:.1f}" for lv in levels]
    return " | ".join(cells)


HEADER = ("| accuracy | level 0 | level 1 | level 2 | mean completion tokens | level 0 | level 1 | level 2 |",
          "|---:|---:|---:|---:|---:|---:|---:|---:|")


def section(results: dict) -> str:
    grid, choice = results["grid"], results["choice"]
    runs = {run["name"]: run for run in results["runs"]}
    chosen = runs[choice["name"]]
    lines = [
        f"Data: `benchmarks/results/opsdc_lab_setting.json`, written by `benchmarks/opsdc_lab_setting.py` "
        f"({results['measured']}). Every run: the lab's teacher, {grid['max_steps']} optimiser steps × "
        f"{grid['per_device_train_batch_size']} prompts (one rollout each, T = 1, ≤ {grid['max_completion_length']} "
        f"tokens), M = {grid['teacher_refresh_steps']}, constant learning rate, weight decay 0.01, seed "
        f"{grid['seed']}. Greedy decoding.",
        "",
        f"**The grid and the rule, fixed before it ran**: learning rate "
        f"{', '.join(_lr(lr) for lr in grid['learning_rates'])} × instruction "
        f"{' and '.join(grid['instructions'])}. On the validation split (90 problems, 30 per level), among the runs "
        f"whose accuracy after training is at most {100 * grid['max_accuracy_drop']:.0f} points below the base "
        f"model's, the one with the shortest completions; if none, the most conservative "
        f"({grid['conservative'][0]} at {_lr(grid['conservative'][1])}). The test split (180 problems) was not used "
        "for the choice.",
        "",
        "| instruction | learning rate | validation accuracy: before → after | the teacher's view | "
        "validation tokens: before → after | the teacher's view | test accuracy after | test tokens after | "
        "run wall time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        val, test = run["validation"], run["test_after"]
        mark = " (chosen)" if run["name"] == choice["name"] else ""
        lines.append(
            f"| {run['instruction']}{mark} | {_lr(run['learning_rate'])} | {_pct(val['before']['accuracy'])} → "
            f"{_pct(val['after']['accuracy'])} | {_pct(val['before_with_instruction']['accuracy'])} | "
            f"{val['before']['mean_completion_tokens']:.1f} → {val['after']['mean_completion_tokens']:.1f} | "
            f"{val['before_with_instruction']['mean_completion_tokens']:.1f} | {_pct(test['accuracy'])} | "
            f"{test['mean_completion_tokens']:.1f} | {run['wall_seconds']:.0f} |"
        )
    before = results["test_before"]
    lines += [
        "",
        f"Base model on the test split: {_pct(before['accuracy'])}, {before['mean_completion_tokens']:.1f} tokens. "
        f"The grid took {results['grid_wall_seconds'] / 60:.1f} min of wall time, {results['parallel_runs']} runs "
        f"at a "
        f"time, on {results['machine']['cpus']} CPU cores shared with other work (load average "
        f"{results['machine']['load_average'][0]:.1f} at the start, {results['load_average_after'][0]:.1f} at the "
        "end).",
        "",
    ]
    if choice["holds_accuracy"]:
        lines.append(f"Chosen: {chosen['instruction']} at learning rate {_lr(chosen['learning_rate'])}, the built-in "
                     "default.")
    else:
        lines.append(f"No run held validation accuracy within {100 * grid['max_accuracy_drop']:.0f} points; the "
                     f"built-in default is the most conservative run, {chosen['instruction']} at "
                     f"{_lr(chosen['learning_rate'])}, and it **does not hold accuracy**.")
    builtin = results.get("builtin")
    if builtin is not None:
        measured = builtin["results"]
        settings = measured["settings"]
        lines += [
            "",
            f"**The built-in run**, `{builtin['command']}` ({settings['concise_instruction']}, learning rate "
            f"{_lr(settings['learning_rate'])}, {settings['max_steps']} steps × "
            f"{settings['per_device_train_batch_size']} prompts, M = {settings['teacher_refresh_steps']}), on the "
            f"{measured['after']['num_problems']} test problems: it took {builtin['wall_seconds']:.0f} s of wall time "
            f"({measured['train_seconds']:.0f} s of training, the rest loading and the three evaluations; one thread, "
            f"load average {builtin['load_average_before'][0]:.1f} at the start).",
            "",
            "| model | " + HEADER[0][2:],
            "|---" + HEADER[1],
            f"| before OPSDC | {_cells(measured['before'])} |",
            f"| before OPSDC, instruction in the prompt (the teacher's view) | "
            f"{_cells(measured['before_with_instruction'])} |",
            f"| after OPSDC | {_cells(measured['after'])} |",
        ]
    return "\n".join(lines) + "\n"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("grid", "builtin", "render", "test-eval"))
    parser.add_argument("model_dir", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--work", default=str(ROOT / "outputs" / "opsdc_lab_setting"))
    parser.add_argument("--write", default=None, help="markdown file whose opsdc-lab-setting section is rewritten")
    return parser


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    if args.mode == "test-eval":
        model_dir = args.model_dir
        if model_dir == "base":
            sys.path.insert(0, str(ROOT / "examples"))
            from opsdc import load_lab

            model_dir = load_lab()["teacher"]
        print(json.dumps(_test_accuracy(model_dir)))
        return
    if args.mode == "grid":
        results = run_grid(Path(args.work))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    elif args.mode == "builtin":
        results = json.loads(RESULTS.read_text())
        results["builtin"] = run_builtin(Path(args.work))
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    else:
        results = json.loads(RESULTS.read_text())
    text = section(results)
    print(text)
    if args.write:
        write_section(args.write, "opsdc-lab-setting", text)


if __name__ == "__main__":
    main()
