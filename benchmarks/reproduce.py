"""
Every method of trl_tip against its baseline on the built-in task, several seeds, in one script.

Each run (one method variant, one seed) trains in a fresh process and writes one JSON file under the output directory
(`outputs/reproduce/<method>/<variant>/seed<k>.json`): test accuracy, mean completion tokens, training wall time,
peak resident memory during training, and the curves the plots need. A run whose JSON already exists with the same
settings is skipped, so an interrupted or partial reproduction resumes where it stopped. `render` turns the JSON files
into the generated sections of `docs/results.md` and the figures under `docs/results/`.

    python benchmarks/reproduce.py all                       # every missing run of both tasks, then render
    python benchmarks/reproduce.py tip --seeds 0 1 2         # one method (renders afterwards)
    python benchmarks/reproduce.py tip --variants soft_or_50 --seeds 0
    python benchmarks/reproduce.py render                    # only rewrite docs/results.md and the figures

The teacher and the student are the built-in ones (`trl_tip.tasks.prepare_arithmetic_models()`, task seed 0) for
every run; `--seeds` sets the training seed (sampling, data order, token sampling of the random selections).
`--task lab` runs the same methods on the lab (`trl_tip.tasks.prepare_lab_models()`: three levels, verbose and
concise styles; results under `outputs/reproduce/lab/`, figures under `docs/results/lab/`), and refuses to while the
lab's preconditions do not hold (docs/lab_task.md). An empty cache starts from the lab pair shipped under
`tests/data/lab/`, the one this page's lab results were measured with.
Runs use one thread each (`OMP_NUM_THREADS=1`) and `--jobs` of them run at once (default 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "outputs" / "reproduce"
DEFAULT_DOC = ROOT / "docs" / "results.md"
DEFAULT_FIGURES = ROOT / "docs" / "results"
SCRIPT = "benchmarks/reproduce.py"

# --- what is run --------------------------------------------------------------------------------------------------

# Fixed before any test result was looked at (see docs/results.md, "Budgets"): the same optimiser steps, batch and
# learning-rate schedule for every variant of a method.
TIP_SETTINGS = {
    "max_steps": 100,
    "per_device_train_batch_size": 32,
    "learning_rate": 5e-4,
    "lr_scheduler_type": "linear",
    "warmup_steps": 20,
    "max_completion_length": 32,
    "temperature": 1.0,
}
PACED_SETTINGS = {
    **TIP_SETTINGS,
    "num_train_problems": 1000,
    "pass_rate_rollouts": 8,
}
OPSDC_SETTINGS = {
    "max_steps": 100,
    "per_device_train_batch_size": 16,
    "learning_rate": 1e-4,
    "max_completion_length": 32,
    "temperature": 1.0,
    # Greedy accuracy and length on the first problems of the validation split, every `curve_every` steps.
    "curve_every": 10,
    "curve_problems": 100,
}

ACE_SETTINGS = {
    # The built-in settings of examples/ace_grpo.py: 8 prompts x 8 rollouts per step, DAPO loss, no KL term.
    "max_steps": 100,
    "per_device_train_batch_size": 64,
    "num_generations": 8,
    "learning_rate": 1e-4,
    "lr_scheduler_type": "constant",
    "max_completion_length": 32,
    "temperature": 1.0,
    "loss_type": "dapo",
    "beta": 0.0,
    # pass@k from this many samples per test problem (T = 1.0, sampling seed = the run's seed).
    "eval_samples": 16,
}

BRIDGE_SETTINGS = {
    # The built-in settings of examples/bridge.py: 2,000 training problems, 32 sequences per step (GRPO: 4 prompts x
    # 8 rollouts), T = 1.0, completions <= 32 tokens; teacher GRPO 30 steps (lr 1e-5), forward-KL warm-up 60 steps and
    # OPD 150 steps (lr 5e-4). Direct student GRPO gets the bridge's 210 student optimiser steps of 32 sequences.
    "num_train_problems": 2000,
    "per_device_train_batch_size": 32,
    "num_generations": 8,
    "max_completion_length": 32,
    "temperature": 1.0,
    "teacher_rl_max_steps": 30,
    "teacher_rl_learning_rate": 1e-5,
    "warmup_max_steps": 60,
    "warmup_learning_rate": 5e-4,
    "opd_max_steps": 150,
    "opd_learning_rate": 5e-4,
    # Greedy accuracy, then mean@16 and pass@k from 16 samples per test problem at T = 1.0.
    "eval_samples": 16,
}

METHODS = {
    "tip": {
        "title": "TIP: token selection in on-policy distillation",
        "baseline": "all",
        # Besides each rule against all tokens: the TIP rules against the random control at the same ratio.
        "comparisons": [("soft_or_50", "random_50"), ("entropy_sample_50", "random_50"),
                        ("soft_or_50_dclip", "soft_or_50"), ("soft_or_50_jsd", "soft_or_50")],
        "settings": TIP_SETTINGS,
        "variants": {
            "all": {"label": "all tokens (plain OPD)", "token_selection": "all", "token_ratio": 1.0},
            "soft_or_50": {"label": "soft-OR 50 %", "token_selection": "soft_or", "token_ratio": 0.5},
            "soft_or_20": {"label": "soft-OR 20 %", "token_selection": "soft_or", "token_ratio": 0.2},
            "entropy_sample_50": {"label": "entropy sample 50 %", "token_selection": "entropy_sample",
                                  "token_ratio": 0.5},
            "overconfident_10": {"label": "overconfident (Q3) 10 %", "token_selection": "overconfident",
                                 "token_ratio": 0.1},
            "random_50": {"label": "random 50 %", "token_selection": "random", "token_ratio": 0.5},
            # The divergence axis of soft-OR (ablation): reverse KL clipped at its batch 98th percentile before
            # min-max, and the bounded JSD / ln 2 the TIP authors' scoring code uses.
            "soft_or_50_dclip": {"label": "soft-OR 50 %, δ clipped at q0.98", "token_selection": "soft_or",
                                 "token_ratio": 0.5, "divergence_clip_quantile": 0.98},
            "soft_or_50_jsd": {"label": "soft-OR 50 %, JSD axis", "token_selection": "soft_or", "token_ratio": 0.5,
                               "selection_divergence": "jsd"},
        },
    },
    "paced": {
        "title": "PACED: pass-rate-weighted distillation",
        "baseline": "unweighted",
        # Besides each variant against the baseline: the schedule at equal weighting.
        "comparisons": [("paced_forward_then_reverse", "paced"), ("paced_sample", "paced")],
        "settings": PACED_SETTINGS,
        "variants": {
            "unweighted": {"label": "unweighted, reverse KL", "paced_alpha": 0.0, "paced_beta": 0.0,
                           "kl_schedule": "reverse"},
            "paced": {"label": "PACED p(1-p), reverse KL", "paced_alpha": 1.0, "paced_beta": 1.0,
                      "kl_schedule": "reverse"},
            "paced_forward_then_reverse": {"label": "PACED p(1-p), forward then reverse KL", "paced_alpha": 1.0,
                                           "paced_beta": 1.0, "kl_schedule": "forward_then_reverse"},
            # Problems drawn in proportion to p(1-p), plain mean: half the rollouts per step of "paced" (16 vs 32),
            # above the effective sample size (Σw)²/Σw² of its weighted batch of 32 (see docs/paced.md).
            "paced_sample": {"label": "PACED p(1-p) sampled, 16 rollouts per step", "paced_alpha": 1.0,
                             "paced_beta": 1.0, "kl_schedule": "reverse", "paced_sampling": "sample",
                             "per_device_train_batch_size": 16},
        },
    },
    "opsdc": {
        "title": "OPSDC: self-distillation for concise reasoning",
        "baseline": None,
        "settings": OPSDC_SETTINGS,
        "variants": {
            "v2_m50": {"label": "v2 instruction, M = 50", "concise_instruction": "v2", "teacher_refresh_steps": 50},
            "v1_m50": {"label": "v1 instruction, M = 50", "concise_instruction": "v1", "teacher_refresh_steps": 50},
            "v2_m10": {"label": "v2 instruction, M = 10", "concise_instruction": "v2", "teacher_refresh_steps": 10},
            "v2_m1": {"label": "v2 instruction, M = 1", "concise_instruction": "v2", "teacher_refresh_steps": 1},
        },
    },
    "ace": {
        "title": "ACE-GRPO: confidence-aware penalty on wrong rollouts",
        "baseline": "grpo",
        "settings": ACE_SETTINGS,
        "variants": {
            "grpo": {"label": "GRPO (TRL's GRPOTrainer)", "ace_alpha": 0.0},
            # The earlier default: c as a per-token mean, which softplus turns into a near-constant factor.
            "ace_mean": {"label": "ACE-GRPO (softplus, α = 1, c = token mean)", "ace_alpha": 1.0,
                         "ace_confidence": "mean"},
            # The paper's c: the sequence-level log-ratio. Last, so the figure's difference panel shows it.
            "ace": {"label": "ACE-GRPO (softplus, α = 1, c = sum)", "ace_alpha": 1.0, "ace_confidence": "sum"},
        },
    },
    "bridge": {
        "title": "The sparse-to-dense bridge against direct student GRPO",
        "baseline": "student_grpo",
        "settings": BRIDGE_SETTINGS,
        "variants": {
            "student_grpo": {"label": "direct student GRPO (210 steps)", "stages": "student_rl", "max_steps": 210,
                             "learning_rate": 1e-5},
            "bridge": {"label": "bridge: teacher GRPO, forward-KL warm-up, OPD", "stages": "teacher_rl,warmup,opd"},
        },
    },
    "taxonomy": {
        "title": "TIP's taxonomy: tokens on the entropy x divergence plane",
        "baseline": None,
        "settings": {"rollouts": 64, "temperature": 1.0, "max_completion_length": 32, "tip_run": "soft_or_50"},
        "variants": {"soft_or_50": {"label": "student before and after TIP soft-OR 50 %"}},
    },
}
RUN_METHODS = ("tip", "paced", "opsdc", "ace", "bridge", "taxonomy")

ARITHMETIC_METHODS = METHODS
TASKS = ("arithmetic", "lab")
# The task whose methods `spec_of` reads: set per run (worker) and per task (driver, render) with `active_task`.
_ACTIVE_TASK = ["arithmetic"]


def spec_of(method: str) -> dict:
    """The method's title, baseline, settings and variants on the active task."""
    return (LAB_METHODS if _ACTIVE_TASK[0] == "lab" else ARITHMETIC_METHODS)[method]


@contextlib.contextmanager
def active_task(task: str):
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    saved = _ACTIVE_TASK[0]
    _ACTIVE_TASK[0] = task
    try:
        yield
    finally:
        _ACTIVE_TASK[0] = saved


def task_out(out: Path, task: str) -> Path:
    """Where a task's runs are stored: the lab's under `lab/` of the output directory."""
    return Path(out) / "lab" if task == "lab" else Path(out)


# --- the lab (`trl_tip.tasks.lab`): the same methods on column addition at three levels, verbose traces ------------

# Fixed before any test result on the lab was seen (see docs/results.md, "The lab: budgets and protocol"). Completions
# may reach the longest verbose solution (122 tokens with its end of turn); steps and batches are smaller than on the
# addition task because every rollout is about four times longer.
LAB_COMPLETION_TOKENS = 128
LAB_TIP_SETTINGS = {**TIP_SETTINGS, "max_steps": 60, "per_device_train_batch_size": 16, "warmup_steps": 10,
                    "max_completion_length": LAB_COMPLETION_TOKENS}
LAB_PACED_SETTINGS = {**LAB_TIP_SETTINGS, "num_train_problems": 400, "pass_rate_rollouts": 8}
LAB_OPSDC_SETTINGS = {**OPSDC_SETTINGS, "max_steps": 60, "per_device_train_batch_size": 8,
                      "max_completion_length": LAB_COMPLETION_TOKENS, "curve_every": 10, "curve_problems": 90}
LAB_ACE_SETTINGS = {**ACE_SETTINGS, "max_steps": 40, "per_device_train_batch_size": 32,
                    "max_completion_length": LAB_COMPLETION_TOKENS, "eval_samples": 16}
LAB_BRIDGE_SETTINGS = {**BRIDGE_SETTINGS, "num_train_problems": 1000, "per_device_train_batch_size": 16,
                       "max_completion_length": LAB_COMPLETION_TOKENS, "teacher_rl_max_steps": 10,
                       "warmup_max_steps": 30, "opd_max_steps": 50}


def _lab_method(method: str, settings: dict, extra_variants: dict | None = None, drop: tuple = ()) -> dict:
    spec = ARITHMETIC_METHODS[method]
    variants = {name: value for name, value in spec["variants"].items() if name not in drop}
    return {**spec, "settings": settings, "variants": {**variants, **(extra_variants or {})}}


LAB_METHODS = {
    "tip": _lab_method("tip", LAB_TIP_SETTINGS),
    "paced": _lab_method("paced", LAB_PACED_SETTINGS, {
        # The student as its own teacher, reading the problem's reference solution (the `solution` column).
        "paced_self": {"label": "PACED p(1-p), self-distillation with the reference solution", "paced_alpha": 1.0,
                       "paced_beta": 1.0, "kl_schedule": "reverse", "self_distillation": True},
    }),
    "opsdc": _lab_method("opsdc", LAB_OPSDC_SETTINGS),
    "ace": _lab_method("ace", LAB_ACE_SETTINGS, {
        # The pathology ACE targets, looked for first: GRPO over three times the steps, pass@k against the base's.
        "grpo_long": {"label": "GRPO, three times the steps", "ace_alpha": 0.0,
                      "max_steps": 3 * LAB_ACE_SETTINGS["max_steps"]},
    }, drop=("ace_mean",)),
    "bridge": _lab_method("bridge", LAB_BRIDGE_SETTINGS),
    "taxonomy": {**ARITHMETIC_METHODS["taxonomy"],
                 "settings": {**ARITHMETIC_METHODS["taxonomy"]["settings"],
                              "max_completion_length": LAB_COMPLETION_TOKENS}},
}
# The student GRPO of the bridge comparison gets the bridge's student steps on the lab too.
LAB_METHODS["bridge"]["variants"] = {
    **LAB_METHODS["bridge"]["variants"],
    "student_grpo": {**ARITHMETIC_METHODS["bridge"]["variants"]["student_grpo"],
                     "label": "direct student GRPO (80 steps)",
                     "max_steps": LAB_BRIDGE_SETTINGS["warmup_max_steps"] + LAB_BRIDGE_SETTINGS["opd_max_steps"]},
}


# Settings the command line may override (to set budgets on the validation split), with their options.
OVERRIDABLE = {"max_steps": "--max-steps", "learning_rate": "--learning-rate"}


def run_settings(method: str, variant: str, seed: int, eval_split: str, overrides: dict | None = None) -> dict:
    """
    Everything that determines a run's result: a stored result is reused only when these are equal. `overrides`
    (keys of `OVERRIDABLE`, `None` for "keep") replace the settings a run has.
    """
    spec = spec_of(method)
    values = {key: value for key, value in spec["variants"][variant].items() if key != "label"}
    settings = {"method": method, "variant": variant, "seed": seed, "eval_split": eval_split, **spec["settings"],
                **values}
    if _ACTIVE_TASK[0] != "arithmetic":
        settings["task"] = _ACTIVE_TASK[0]
    for key, value in (overrides or {}).items():
        if value is not None and key in settings:
            settings[key] = value
    return settings


def run_path(out: Path, method: str, variant: str, seed: int) -> Path:
    return out / method / variant / f"seed{seed}.json"


def run_dir(out: Path, method: str, variant: str, seed: int) -> Path:
    """Where a run keeps files besides its JSON (the TIP run the taxonomy pictures saves its student there)."""
    return run_path(out, method, variant, seed).with_suffix("")


def row_command(method: str, variant: str, seeds: list[int], settings: dict | None = None) -> str:
    """The command that reproduces a row; `settings` (of one of its runs) adds the options not at their defaults."""
    command = f"python {SCRIPT} {method} --variants {variant} --seeds {' '.join(map(str, seeds))}"
    if _ACTIVE_TASK[0] != "arithmetic":
        command += f" --task {_ACTIVE_TASK[0]}"
    if settings is not None:
        if settings.get("eval_split", "test") != "test":
            command += f" --eval-split {settings['eval_split']}"
        defaults = run_settings(method, variant, 0, "test")
        for key, option in OVERRIDABLE.items():
            if key in defaults and settings.get(key, defaults[key]) != defaults[key]:
                command += f" {option} {settings[key]:g}"
    return command


# --- measurement helpers (worker side) -----------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM (the peak) to the current resident memory.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _train_measured(trainer) -> dict:
    """
    Train; return the wall and CPU time of training and its peak resident memory (absolute and above the loaded
    state). With one thread per run, CPU time is what the run costs whatever else the machine is doing.
    """
    loaded = _status_kib("VmRSS") / 1024
    _reset_peak_rss()
    started, started_cpu = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    peak = _status_kib("VmHWM") / 1024
    return {"train_seconds": seconds, "train_cpu_seconds": cpu, "loaded_rss_mib": loaded, "peak_rss_mib": peak,
            "peak_above_loaded_mib": peak - loaded}


def _log_series(trainer, keys: tuple[str, ...]) -> dict:
    series = defaultdict(list)
    for entry in trainer.state.log_history:
        if "step" in entry:
            for key in keys:
                if key in entry:
                    series[key].append([entry["step"], entry[key]])
    return dict(series)


def _common_config(settings: dict, seed: int, output_dir: str) -> dict:
    keys = ("max_steps", "per_device_train_batch_size", "learning_rate", "max_completion_length", "temperature")
    config = {key: settings[key] for key in keys}
    for key in ("lr_scheduler_type", "warmup_steps"):
        if key in settings:
            config[key] = settings[key]
    return {**config, "output_dir": output_dir, "seed": seed, "logging_steps": 10, "save_strategy": "no",
            "report_to": "none", "bf16": False, "gradient_checkpointing": False, "disable_tqdm": True}


def _worker_tip(settings: dict, prepared: dict, tokenizer, output_dir: str, directory: Path) -> dict:
    from trl_tip import TipDistillConfig, TipDistillTrainer

    config = TipDistillConfig(**_common_config(settings, settings["seed"], output_dir),
                              token_selection=settings["token_selection"], token_ratio=settings["token_ratio"],
                              divergence_clip_quantile=settings.get("divergence_clip_quantile", 1.0),
                              selection_divergence=settings.get("selection_divergence", "reverse_kl"))
    trainer = TipDistillTrainer(model=prepared["student"], teacher_model=prepared["teacher"], args=config,
                                train_dataset=prepared["dataset"]["train"], processing_class=tokenizer)
    result = _train_measured(trainer)
    keys = ("loss", "tip/kept_fraction", "tip/q1_share", "tip/q2_share", "tip/q3_share", "tip/q4_share",
            "tip/divergence_hat_p50", "tip/divergence_hat_p90")
    result["history"] = _log_series(trainer, keys)
    result["model"] = trainer.model
    if settings["variant"] == spec_of("taxonomy")["settings"]["tip_run"] and settings["seed"] == 0:
        # The taxonomy figure reads the student after this run.
        trainer.model.save_pretrained(directory / "model")
        tokenizer.save_pretrained(directory / "model")
    return result


def _worker_paced(settings: dict, prepared: dict, tokenizer, output_dir: str, directory: Path) -> dict:
    from trl_tip import PacedConfig, PacedTrainer

    train = prepared["dataset"]["train"].select(range(settings["num_train_problems"]))
    config = PacedConfig(**_common_config(settings, settings["seed"], output_dir),
                         paced_alpha=settings["paced_alpha"], paced_beta=settings["paced_beta"],
                         kl_schedule=settings["kl_schedule"], pass_rate_rollouts=settings["pass_rate_rollouts"],
                         paced_sampling=settings.get("paced_sampling", "weight"),
                         self_distillation=settings.get("self_distillation", False))
    # Self-distillation: the teacher is a frozen copy of the student reading the reference solution.
    teacher = None if config.self_distillation else prepared["teacher"]
    trainer = PacedTrainer(model=prepared["student"], teacher_model=teacher, args=config,
                           train_dataset=train, processing_class=tokenizer, reward_funcs=["math"])
    estimate, spent, spent_cpu = trainer.estimate_pass_rates, [], []

    def timed_estimate():
        started, started_cpu = time.perf_counter(), time.process_time()
        try:
            return estimate()
        finally:
            spent.append(time.perf_counter() - started)
            spent_cpu.append(time.process_time() - started_cpu)

    trainer.estimate_pass_rates = timed_estimate
    result = _train_measured(trainer)
    result["estimation_seconds"] = sum(spent)
    result["estimation_cpu_seconds"] = sum(spent_cpu)
    result["pass_rate_histogram"] = trainer.pass_rate_table.histogram()
    table = trainer.pass_rate_table
    weights = table.weights(settings["paced_alpha"], settings["paced_beta"]).double()
    result["training_rollouts"] = trainer._training_rollouts
    result["estimation_rollouts"] = table.estimates * len(table) * settings["pass_rate_rollouts"]
    # Kish effective sample size of a uniformly drawn weighted batch, per rollout: (E w)² / E w².
    result["weighted_batch_ess_fraction"] = (weights.mean() ** 2 / (weights**2).mean()).item()
    result["history"] = _log_series(trainer, ("loss", "paced/weight_mean", "paced/zero_weight_share"))
    result["model"] = trainer.model
    return result


def _worker_opsdc(settings: dict, prepared: dict, tokenizer, output_dir: str, directory: Path) -> dict:
    from transformers import TrainerCallback

    from trl_tip import OPSDCConfig, OPSDCTrainer, add_instruction, math_reward

    curve_set = prepared["dataset"]["validation"].select(range(settings["curve_problems"]))
    curve, spent, spent_cpu = [], [], []

    class Curve(TrainerCallback):
        def _measure(self, model, step):
            started, started_cpu = time.perf_counter(), time.process_time()
            measured = _evaluate(model, tokenizer, curve_set, settings["max_completion_length"])
            point = [step, measured["accuracy"], measured["mean_completion_tokens"]]
            if "levels" in measured:
                point.append({level: [m["accuracy"], m["mean_completion_tokens"]]
                              for level, m in measured["levels"].items()})
            curve.append(point)
            spent.append(time.perf_counter() - started)
            spent_cpu.append(time.process_time() - started_cpu)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._measure(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % settings["curve_every"] == 0:
                self._measure(model, state.global_step)

    config = OPSDCConfig(**_common_config(settings, settings["seed"], output_dir),
                         concise_instruction=settings["concise_instruction"],
                         teacher_refresh_steps=settings["teacher_refresh_steps"])
    # The competent built-in model (the teacher of the other methods) is the one whose reasoning could be compressed.
    trainer = OPSDCTrainer(model=prepared["teacher"], args=config, train_dataset=prepared["dataset"]["train"],
                           processing_class=tokenizer, reward_funcs=[math_reward], callbacks=[Curve()])
    test = prepared["dataset"][settings["eval_split"]]
    instructed = test.map(lambda row: {"prompt": add_instruction(row["prompt"], trainer.concise_instruction)})
    before = _evaluate(trainer.model, tokenizer, test, settings["max_completion_length"])
    teachers_view = _evaluate(trainer.model, tokenizer, instructed, settings["max_completion_length"])
    result = _train_measured(trainer)
    # Curve evaluations ran inside `train`; they are not training.
    result["train_seconds"] -= sum(spent)
    result["train_cpu_seconds"] -= sum(spent_cpu)
    result["before"] = before
    result["teachers_view"] = teachers_view
    result["curve"] = curve
    result["history"] = _log_series(trainer, ("loss", "completions/mean_length", "opsdc/accuracy",
                                              "opsdc/compression", "opsdc/teacher_refreshes"))
    result["model"] = trainer.model
    return result


# ACEGRPOTrainer's logged distributions of the confidence shift c and of the factor on wrong rollouts.
ACE_LOGGED = ("ace/confidence_shift_mean", "ace/confidence_shift_p10", "ace/confidence_shift_p50",
              "ace/confidence_shift_p90", "ace/confidence_shift_max", "ace/scale_factor_mean", "ace/scale_factor_p50",
              "ace/scale_factor_p90", "ace/scale_factor_max")


def _worker_ace(settings: dict, prepared: dict, tokenizer, output_dir: str, directory: Path) -> dict:
    from trl import GRPOTrainer

    from trl_tip import ACEGRPOConfig, ACEGRPOTrainer, evaluate_pass_at_k, math_reward

    test = prepared["dataset"][settings["eval_split"]]

    def pass_at_k(model):
        measured = evaluate_pass_at_k(model, tokenizer, test, num_samples=settings["eval_samples"],
                                      max_new_tokens=settings["max_completion_length"],
                                      temperature=settings["temperature"], seed=settings["seed"])
        return {**measured, "pass_at_k": {str(k): v for k, v in measured["pass_at_k"].items()}}

    config = ACEGRPOConfig(**_common_config(settings, settings["seed"], output_dir),
                           num_generations=settings["num_generations"], loss_type=settings["loss_type"],
                           beta=settings["beta"], ace_alpha=settings["ace_alpha"],
                           ace_confidence=settings.get("ace_confidence", "sum"))
    # The baseline is TRL's own trainer (ACE with α = 0 is the same update; the baseline needs no ACE code at all).
    trainer_class = GRPOTrainer if settings["ace_alpha"] == 0 else ACEGRPOTrainer
    trainer = trainer_class(model=prepared["student"], reward_funcs=[math_reward], args=config,
                            train_dataset=prepared["dataset"]["train"], processing_class=tokenizer)
    before = pass_at_k(trainer.model)
    result = _train_measured(trainer)
    result["before_pass_at_k"] = before
    result["pass_at_k"] = pass_at_k(trainer.model)
    result["history"] = _log_series(trainer, ("loss", "reward", *ACE_LOGGED))
    result["model"] = trainer.model
    return result


def _worker_bridge(settings: dict, prepared: dict, tokenizer, output_dir: str, directory: Path) -> dict:
    """Run `examples/bridge.py` in this process (its stages, its evaluation), timing and measuring each stage."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bridge_example", ROOT / "examples" / "bridge.py")
    bridge = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bridge
    spec.loader.exec_module(bridge)
    stage_costs = {}
    train_stage = bridge.train_stage

    def measured_stage(stage, *args, **kwargs):
        loaded = _status_kib("VmRSS") / 1024
        _reset_peak_rss()
        started, started_cpu = time.perf_counter(), time.process_time()
        metrics = train_stage(stage, *args, **kwargs)
        peak = _status_kib("VmHWM") / 1024
        stage_costs[stage] = {"train_seconds": time.perf_counter() - started,
                              "train_cpu_seconds": time.process_time() - started_cpu, "loaded_rss_mib": loaded,
                              "peak_rss_mib": peak, "peak_above_loaded_mib": peak - loaded}
        return metrics

    bridge.train_stage = measured_stage
    argv = ["--output_dir", output_dir, "--seed", str(settings["seed"]), "--stages", settings["stages"],
            "--dataset_test_split", settings["eval_split"], "--eval_num_samples", str(settings["eval_samples"]),
            "--eval_temperature", str(settings["temperature"]), "--gradient_checkpointing", "False"]
    for key in ("num_train_problems", "per_device_train_batch_size", "num_generations", "max_completion_length",
                "temperature", "teacher_rl_max_steps", "teacher_rl_learning_rate", "warmup_max_steps",
                "warmup_learning_rate", "opd_max_steps", "opd_learning_rate"):
        argv += [f"--{key}", str(settings[key])]
    if _ACTIVE_TASK[0] == "lab":
        argv += ["--builtin_task", "lab"]
    if "max_steps" in settings:  # direct student GRPO
        argv += ["--student_rl_max_steps", str(settings["max_steps"]),
                 "--student_rl_learning_rate", str(settings["learning_rate"])]
    rows = bridge.main(argv)
    final = rows[-1]["test"]
    costs = list(stage_costs.values())
    return {
        "train_seconds": sum(c["train_seconds"] for c in costs),
        "train_cpu_seconds": sum(c["train_cpu_seconds"] for c in costs),
        "peak_rss_mib": max(c["peak_rss_mib"] for c in costs),
        "peak_above_loaded_mib": max(c["peak_above_loaded_mib"] for c in costs),
        "stage_costs": stage_costs,
        "stages": [{"stage": row["stage"], "model": row["model"], "test": row["test"]} for row in rows],
        "eval": {"accuracy": final["greedy_accuracy"],
                 "mean_completion_tokens": final["greedy_mean_completion_tokens"],
                 "num_problems": final["num_problems"]},
        "sampled": {"mean_accuracy": final["mean_accuracy"], "pass_at_k": final["pass_at_k"],
                    "mean_completion_tokens": final["mean_completion_tokens"]},
    }


def _worker_taxonomy(settings: dict, prepared: dict, tokenizer, output_dir: str, directory: Path, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from trl_tip import select_tokens, token_stats
    from trl_tip.selection import quadrant_counts, quantile

    trained = run_dir(out, "tip", settings["tip_run"], 0) / "model"
    if not trained.exists():
        raise FileNotFoundError(f"{trained} is missing: run `python {SCRIPT} tip --variants {settings['tip_run']} "
                                "--seeds 0` first (its student after training is saved there).")
    teacher = AutoModelForCausalLM.from_pretrained(prepared["teacher"]).eval()
    prompts = list(prepared["dataset"]["train"]["prompt"][: settings["rollouts"]])
    panels = {}
    for name, path in (("before", prepared["student"]), ("after", str(trained))):
        student = AutoModelForCausalLM.from_pretrained(path).eval()
        torch.manual_seed(settings["seed"])
        batch = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              padding=True, return_tensors="pt")
        with torch.no_grad():
            sequences = student.generate(**batch, max_new_tokens=settings["max_completion_length"], do_sample=True,
                                         temperature=settings["temperature"], top_p=None, top_k=None,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            prompt_width = batch["input_ids"].shape[1]
            completion = sequences[:, prompt_width:]
            # Completion tokens up to and including the first end of turn, as the trainers mask them.
            is_eos = completion == tokenizer.eos_token_id
            after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
            mask = ~after_eos
            attention = torch.cat([batch["attention_mask"], mask.long()], dim=1)
            # The hidden state at position t - 1 predicts completion token t.
            positions = slice(prompt_width - 1, sequences.shape[1] - 1)
            h_s = student.model(input_ids=sequences, attention_mask=attention).last_hidden_state[:, positions]
            h_t = teacher.model(input_ids=sequences, attention_mask=attention).last_hidden_state[:, positions]
            stats = token_stats(h_s, student.lm_head.weight, h_t, teacher.lm_head.weight,
                                temperature=settings["temperature"])
            kept = select_tokens(stats.entropy, stats.reverse_kl, mask, method="soft_or", ratio=0.5)
        h, d = stats.entropy[mask], stats.reverse_kl[mask]
        counts = quadrant_counts(stats.entropy, stats.reverse_kl, mask)
        kept_counts = torch.zeros(4)
        high_h, high_d = h > quantile(h, 0.5), d > quantile(d, 0.5)
        quadrant = torch.where(high_h & high_d, 1, torch.where(high_h, 2, torch.where(high_d, 3, 4)))
        kept_flat = kept[mask]
        for q in range(4):
            kept_counts[q] = (kept_flat & (quadrant == q + 1)).sum()
        panels[name] = {
            "entropy": [round(x, 6) for x in h.tolist()],
            "reverse_kl": [round(x, 6) for x in d.tolist()],
            "quadrant": quadrant.tolist(),
            "soft_or_kept": kept_flat.int().tolist(),
            "quadrant_shares": (counts / counts.sum()).tolist(),
            "soft_or_kept_by_quadrant": (kept_counts / counts.clamp(min=1)).tolist(),
            "median_entropy": quantile(h, 0.5).item(),
            "median_reverse_kl": quantile(d, 0.5).item(),
            "tokens": int(mask.sum()),
        }
    return {"panels": panels}


def worker(args) -> None:
    import resource

    import torch
    from transformers import AutoTokenizer

    started_wall, started_cpu = time.perf_counter(), time.process_time()
    torch.set_num_threads(1)
    with active_task(args.task):
        _work(args, started_wall, started_cpu)


# The lab's teacher and student that docs/results.md was measured with (the test suite re-measures their
# preconditions). Their training is not bit-reproducible across processors, and on another one a freshly prepared lab
# can miss a precondition, so a reproduction starts from this pair unless the cache already holds the lab.
SHIPPED_LAB = ROOT / "tests" / "data" / "lab"


def seed_lab_cache(cache_dir: Path | None = None, shipped: Path = SHIPPED_LAB) -> Path | None:
    """
    Copy the shipped lab pair into the cache (`cache_dir`, default `default_cache_dir()`) when the cache has no lab of
    the same version and seed. Returns the copy's directory, or `None` when nothing was copied.
    """
    import shutil

    from trl_tip.tasks import LabTask
    from trl_tip.tasks.arithmetic import default_cache_dir

    key = LabTask().cache_key
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()) / key
    if (target / "metrics.json").exists() or not (Path(shipped) / key / "metrics.json").exists():
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(Path(shipped) / key, staging)
    staging.rename(target)
    return target


def _prepared_models() -> dict:
    """The active task's teacher, student and splits (trained on first use, then cached)."""
    if _ACTIVE_TASK[0] == "lab":
        from trl_tip.tasks import prepare_lab_models

        prepared = prepare_lab_models(verbose=False)
        failures = prepared["metrics"]["precondition_failures"]
        if failures:
            # The lab is an instrument only when its preconditions hold; a method's result on it would mean nothing.
            raise SystemExit(f"The lab's preconditions do not hold ({'; '.join(failures)}); see "
                             f"{Path(prepared['teacher']).parent / 'metrics.json'}. No method is run on it.")
        return prepared
    from trl_tip.tasks import prepare_arithmetic_models

    return prepare_arithmetic_models(verbose=False)


def _evaluate(model, tokenizer, dataset, max_new_tokens: int) -> dict:
    """Greedy accuracy and mean completion tokens; on the lab also per level (`levels`)."""
    if _ACTIVE_TASK[0] == "lab":
        from trl_tip.tasks import accuracy_by_level

        return accuracy_by_level(model, tokenizer, dataset, max_new_tokens=max_new_tokens)
    from trl_tip.tasks import evaluate_accuracy

    return evaluate_accuracy(model, tokenizer, dataset, max_new_tokens=max_new_tokens)


def _work(args, started_wall: float, started_cpu: float) -> None:
    import resource

    import torch
    from transformers import AutoTokenizer

    out = Path(args.out)
    overrides = {"max_steps": args.max_steps, "learning_rate": args.learning_rate}
    settings = run_settings(args.method, args.variant, args.seed, args.eval_split, overrides)
    path = run_path(out, args.method, args.variant, args.seed)
    directory = run_dir(out, args.method, args.variant, args.seed)
    prepared = _prepared_models()
    tokenizer = AutoTokenizer.from_pretrained(prepared["student"], padding_side="left")
    with tempfile.TemporaryDirectory() as output_dir:
        if args.method == "taxonomy":
            result = _worker_taxonomy(settings, prepared, tokenizer, output_dir, directory, out)
        elif args.method == "bridge":
            # The pipeline evaluates its own models (greedy and sampled), on the split asked for.
            result = _worker_bridge(settings, prepared, tokenizer, output_dir, directory)
        else:
            workers = {"tip": _worker_tip, "paced": _worker_paced, "opsdc": _worker_opsdc, "ace": _worker_ace}
            work = workers[args.method]
            result = work(settings, prepared, tokenizer, output_dir, directory)
            model = result.pop("model")
            result["eval"] = _evaluate(model, tokenizer, prepared["dataset"][args.eval_split],
                                       settings["max_completion_length"])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {
        "settings": settings,
        "command": row_command(args.method, args.variant, [args.seed], settings),
        "student_before": prepared["metrics"]["student_test_accuracy"],
        "teacher": prepared["metrics"]["teacher_test_accuracy"],
        **result,
        "process_wall_seconds": time.perf_counter() - started_wall,
        "process_cpu_seconds": time.process_time() - started_cpu,
        "process_max_rss_mib": usage.ru_maxrss / 1024,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


# --- running (driver side) -----------------------------------------------------------------------------------------


# What a stored result must hold besides equal settings (results of older versions of this script are rerun).
REQUIRED_KEYS = {"tip": ("eval", "train_cpu_seconds"), "paced": ("eval", "train_cpu_seconds"),
                 "opsdc": ("eval", "train_cpu_seconds", "curve"), "ace": ("eval", "train_cpu_seconds", "pass_at_k"),
                 "bridge": ("eval", "train_cpu_seconds", "stages"), "taxonomy": ("panels",)}


def _is_current(path: Path, settings: dict) -> bool:
    if not path.exists():
        return False
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return record.get("settings") == settings and all(key in record for key in REQUIRED_KEYS[settings["method"]])


def pending_runs(method: str, variants: list[str], seeds: list[int], out: Path, eval_split: str, force: bool,
                 overrides: dict | None = None):
    if method == "taxonomy":
        seeds = [0]
    runs = []
    for variant in variants:
        for seed in seeds:
            path = run_path(out, method, variant, seed)
            if force or not _is_current(path, run_settings(method, variant, seed, eval_split, overrides)):
                runs.append((method, variant, seed))
    return runs


def execute(runs: list[tuple[str, str, int]], out: Path, eval_split: str, jobs: int, overrides: dict | None = None
            ) -> float:
    """Run each (method, variant, seed) in its own process, `jobs` at a time; return the wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    queue, running, failed = list(runs), [], []
    while queue or running:
        while queue and len(running) < jobs:
            method, variant, seed = queue.pop(0)
            log = run_path(out, method, variant, seed).with_suffix(".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, str(Path(__file__).resolve()), "_worker", "--method", method, "--variant",
                       variant, "--seed", str(seed), "--out", str(out), "--eval-split", eval_split,
                       "--task", _ACTIVE_TASK[0]]
            for key, value in (overrides or {}).items():
                if value is not None:
                    command += [OVERRIDABLE[key], str(value)]
            handle = open(log, "w")
            running.append(((method, variant, seed), subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                                                      env=env, cwd=ROOT), handle, time.perf_counter()))
            print(f"[{time.perf_counter() - started:6.0f} s] start {method}/{variant}/seed{seed}", flush=True)
        time.sleep(0.5)
        for entry in list(running):
            run, process, handle, run_started = entry
            if process.poll() is None:
                continue
            handle.close()
            running.remove(entry)
            state = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
            print(f"[{time.perf_counter() - started:6.0f} s] {state} {'/'.join(map(str, run))} "
                  f"({time.perf_counter() - run_started:.0f} s)", flush=True)
            if process.returncode != 0:
                failed.append(run)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {failed}; see the .log files next to their results in {out}.")
    return time.perf_counter() - started


# --- rendering -----------------------------------------------------------------------------------------------------


def load_results(out: Path) -> dict:
    """{method: {variant: [record, ...] sorted by seed}} for every JSON under `out`."""
    results = defaultdict(lambda: defaultdict(list))
    for path in sorted(Path(out).glob("*/*/seed*.json")):
        record = json.loads(path.read_text())
        settings = record["settings"]
        results[settings["method"]][settings["variant"]].append(record)
    for variants in results.values():
        for records in variants.values():
            records.sort(key=lambda record: record["settings"]["seed"])
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1); the deviation is 0 for a single value."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _lr(value: float) -> str:
    """A learning rate as people write it: 5e-4, 1e-5, 0.01."""
    return re.sub(r"e-0*(\d)", r"e-\1", f"{value:.0e}") if value < 1e-3 else f"{value:g}"


def _pm(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean, std = mean_std([value * scale for value in values])
    mean = 0.0 if round(mean, digits) == 0 else mean  # no "-0.0"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _seeds(records) -> list[int]:
    return [record["settings"]["seed"] for record in records]


def _ordered(method: str, variants: dict) -> list[str]:
    return [name for name in spec_of(method)["variants"] if name in variants]


def _accuracy_table(method: str, variants: dict) -> str:
    lines = [
        "| variant | test accuracy (%) | per seed (%) | mean completion tokens | train CPU time (s) | train wall "
        "time (s) | peak RSS in training (MiB) | peak above loaded models (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in _ordered(method, variants):
        records = variants[name]
        label = spec_of(method)["variants"][name]["label"]
        accuracies = [r["eval"]["accuracy"] for r in records]
        lines.append(
            f"| {label} | {_pm(accuracies, 100)} | {' / '.join(f'{100 * a:.1f}' for a in accuracies)} "
            f"| {_pm([r['eval']['mean_completion_tokens'] for r in records])} "
            f"| {_pm([r['train_cpu_seconds'] for r in records], digits=1)} "
            f"| {_pm([r['train_seconds'] for r in records], digits=0)} "
            f"| {_pm([r['peak_rss_mib'] for r in records], digits=0)} "
            f"| {_pm([r['peak_above_loaded_mib'] for r in records], digits=0)} |"
        )
    return "\n".join(lines)


def _differences(method: str, variants: dict) -> str:
    """
    Each variant minus the baseline (and the method's extra comparisons), seed by seed (paired: same seed, same data
    order), mean ± std.
    """
    spec = spec_of(method)
    pairs = [(name, spec["baseline"]) for name in _ordered(method, variants) if name != spec["baseline"]]
    pairs += spec.get("comparisons", [])
    labels = spec["variants"]
    lines = ["| comparison | accuracy difference, paired by seed (points) | seeds better / equal / worse |",
             "|---|---:|---:|"]
    for name, reference in pairs:
        if name not in variants or reference not in variants:
            continue
        base = {r["settings"]["seed"]: r["eval"]["accuracy"] for r in variants[reference]}
        deltas = [100 * (r["eval"]["accuracy"] - base[r["settings"]["seed"]]) for r in variants[name]
                  if r["settings"]["seed"] in base]
        if not deltas:
            continue
        better = sum(d > 1e-9 for d in deltas)
        worse = sum(d < -1e-9 for d in deltas)
        lines.append(f"| {labels[name]['label']} − {labels[reference]['label']} | {_pm(deltas, digits=1)} "
                     f"| {better} / {len(deltas) - better - worse} / {worse} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _commands(method: str, variants: dict) -> str:
    lines = [row_command(method, name, sorted(set(_seeds(variants[name]))), variants[name][0]["settings"])
             for name in _ordered(method, variants)]
    return "```bash\n" + "\n".join(lines) + "\n```"


def _run_totals(records: list[dict]) -> str:
    wall = sum(r["process_wall_seconds"] for r in records)
    cpu = sum(r["process_cpu_seconds"] for r in records)
    runs = f"{len(records)} run{'s' if len(records) != 1 else ''}"
    return f"{runs}, {wall / 60:.1f} min of process wall time, {cpu / 60:.1f} min of CPU time"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(method: str, variants: dict, path: Path) -> None:
    plt = _plt()
    names = _ordered(method, variants)
    labels = [spec_of(method)["variants"][n]["label"].replace(", ", ",\n") for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    for axis, key, scale, title in ((left, "accuracy", 100, "test accuracy (%)"),
                                    (right, "train_cpu_seconds", 1, "training CPU time (s, one thread)")):
        means, stds = [], []
        for index, name in enumerate(names):
            records = variants[name]
            values = [scale * (r["eval"]["accuracy"] if key == "accuracy" else r[key]) for r in records]
            mean, std = mean_std(values)
            means.append(mean)
            stds.append(std)
            axis.scatter([index] * len(values), values, color="black", s=10, zorder=3)
        colors = ["#888888" if n == spec_of(method)["baseline"] else "#3a76af" for n in names]
        axis.bar(range(len(names)), means, yerr=stds, capsize=4, color=colors)
        axis.set_xticks(range(len(names)), labels, rotation=35, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
    first = variants[names[0]][0]
    left.axhline(100 * first["student_before"], color="#c44e52", linestyle="--", linewidth=1)
    left.axhline(100 * first["teacher"], color="#55a868", linestyle=":", linewidth=1)
    left.set_title(f"test accuracy (%); dashed: student before ({100 * first['student_before']:.1f} %), "
                   f"dotted: teacher ({100 * first['teacher']:.1f} %)", fontsize=10)
    left.set_ylim(0, 105)
    seeds = len(variants[names[0]])
    fig.suptitle(f"{spec_of(method)['title']} (mean ± std over {seeds} seeds; dots: seeds; grey: baseline)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_opsdc(variants: dict, path: Path) -> None:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in _ordered("opsdc", variants):
        records = variants[name]
        steps = [point[0] for point in records[0]["curve"]]
        label = spec_of("opsdc")["variants"][name]["label"]
        for axis, column, scale in ((left, 1, 100), (right, 2, 1)):
            rows = [[scale * point[column] for point in r["curve"]] for r in records]
            stats = [mean_std(list(values)) for values in zip(*rows)]
            means = [m for m, _ in stats]
            stds = [s for _, s in stats]
            line = axis.plot(steps, means, marker="o", markersize=3, label=label)[0]
            axis.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                              color=line.get_color(), alpha=0.15)
    cap = next(iter(variants.values()))[0]["settings"]["max_completion_length"]
    right.axhline(cap + 1, color="black", linestyle=":", linewidth=1)
    right.text(0, cap + 0.6, f"generation limit ({cap} tokens + end of turn)", fontsize=8, va="top")
    problems = next(iter(variants.values()))[0]["settings"]["curve_problems"]
    left.set_title(f"greedy accuracy, {problems} validation problems (%)", fontsize=10)
    right.set_title("mean completion tokens (greedy, same problems)", fontsize=10)
    for axis in (left, right):
        axis.set_xlabel("optimiser step")
    left.set_ylim(-3, 103)
    left.legend(fontsize=8)
    seeds = len(next(iter(variants.values())))
    fig.suptitle(f"{spec_of('opsdc')['title']} (mean ± std over {seeds} seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ace(variants: dict, path: Path) -> None:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = _ordered("ace", variants)
    ks = sorted(int(k) for k in variants[names[0]][0]["pass_at_k"]["pass_at_k"])
    curves = {"student before": [r["before_pass_at_k"] for r in variants[names[0]]]}
    curves.update({spec_of("ace")["variants"][n]["label"]: [r["pass_at_k"] for r in variants[n]] for n in names})
    for label, measured in curves.items():
        stats = [mean_std([100 * m["pass_at_k"][str(k)] for m in measured]) for k in ks]
        means, stds = [m for m, _ in stats], [s for _, s in stats]
        line = left.plot(ks, means, marker="o", markersize=3, label=label,
                         linestyle="--" if label == "student before" else "-")[0]
        left.fill_between(ks, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                          color=line.get_color(), alpha=0.15)
    baseline, method = spec_of("ace")["baseline"], names[-1]
    if baseline in variants and method != baseline:
        base = {r["settings"]["seed"]: r["pass_at_k"]["pass_at_k"] for r in variants[baseline]}
        stats = [mean_std([100 * (r["pass_at_k"]["pass_at_k"][str(k)] - base[r["settings"]["seed"]][str(k)])
                           for r in variants[method] if r["settings"]["seed"] in base]) for k in ks]
        means, stds = [m for m, _ in stats], [s for _, s in stats]
        right.plot(ks, means, marker="o", markersize=3, color="#c44e52")
        right.fill_between(ks, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                           color="#c44e52", alpha=0.15)
        right.axhline(0, color="black", linewidth=0.7)
        label = spec_of("ace")["variants"][method]["label"]
        right.set_title(f"{label} − GRPO, paired by seed (points)", fontsize=10)
    samples = variants[names[0]][0]["settings"]["eval_samples"]
    left.set_title(f"pass@k on the test split (%), unbiased, from {samples} samples per problem", fontsize=10)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ks, [str(k) if k & (k - 1) == 0 else "" for k in ks])
        axis.set_xlabel("k")
    left.legend(fontsize=8)
    seeds = len(variants[names[0]])
    fig.suptitle(f"{spec_of('ace')['title']} (mean ± std over {seeds} seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


STAGE_NAMES = {("initial", "teacher"): "teacher before", ("initial", "student"): "student before",
               ("teacher_rl", "teacher"): "teacher after its GRPO", ("warmup", "student"): "student after the warm-up",
               ("opd", "student"): "student after OPD (the bridge's output)",
               ("student_rl", "student"): "student after direct GRPO"}


def _bridge_rows(variants: dict) -> list[tuple[str, str, list[dict], list[dict] | None]]:
    """(variant, label, per-seed test results, per-seed stage costs or None) for every evaluated model."""
    rows, seen = [], set()
    for name in _ordered("bridge", variants):
        records = variants[name]
        for index, stage in enumerate(records[0]["stages"]):
            key = (stage["stage"], stage["model"])
            if key in seen or stage["test"] is None:
                continue
            seen.add(key)
            tests = [r["stages"][index]["test"] for r in records]
            costs = [r["stage_costs"][stage["stage"]] for r in records] if stage["stage"] != "initial" else None
            rows.append((name, STAGE_NAMES.get(key, f"{stage['model']} after {stage['stage']}"), tests, costs))
    return rows


def plot_bridge(variants: dict, path: Path) -> None:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    rows = [row for row in _bridge_rows(variants) if row[1] != "teacher before" and "teacher" not in row[1]]
    n = variants[_ordered("bridge", variants)[0]][0]["settings"]["eval_samples"]
    metrics = (("greedy_accuracy", "greedy accuracy"), ("mean_accuracy", f"mean@{n}"), (None, f"pass@{n}"))
    width = 0.8 / len(metrics)
    for offset, (key, label) in enumerate(metrics):
        stats = [mean_std([100 * (t[key] if key else t["pass_at_k"][str(n)]) for t in tests])
                 for _, _, tests, _ in rows]
        xs = [i + (offset - 1) * width for i in range(len(rows))]
        left.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3, label=label)
    left.set_xticks(range(len(rows)), [row[1].replace(" (", "\n(") for row in rows], rotation=20, ha="right",
                    fontsize=8)
    left.set_ylim(0, 105)
    left.set_title(f"test accuracy (%): greedy, and from {n} samples at T = 1", fontsize=10)
    left.legend(fontsize=8, loc="upper left")
    bottom = defaultdict(float)
    names = _ordered("bridge", variants)
    for stage in ("teacher_rl", "warmup", "opd", "student_rl"):
        heights = [mean_std([r["stage_costs"][stage]["train_cpu_seconds"] for r in variants[name]])[0]
                   if stage in variants[name][0]["stage_costs"] else 0.0 for name in names]
        if any(heights):
            right.bar(range(len(names)), heights, bottom=[bottom[name] for name in names], label=stage)
            for name, height in zip(names, heights):
                bottom[name] += height
    right.set_xticks(range(len(names)), [spec_of("bridge")["variants"][name]["label"].replace(": ", ":\n")
                                         for name in names], fontsize=8)
    right.set_title("training CPU time by stage (s, one thread)", fontsize=10)
    right.set_ylim(0, 1.4 * max(bottom.values()))  # room for the legend above the bars
    right.legend(fontsize=8, loc="upper left", ncol=2)
    seeds = len(variants[names[0]])
    fig.suptitle(f"{spec_of('bridge')['title']} (mean ± std over {seeds} seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


QUADRANT_COLORS = {1: "#c44e52", 2: "#dd8452", 3: "#8172b3", 4: "#9a9a9a"}
QUADRANT_NAMES = {1: "Q1 high h, high δ", 2: "Q2 high h, low δ", 3: "Q3 low h, high δ (overconfident)",
                  4: "Q4 low h, low δ"}


def plot_taxonomy(record: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    titles = {"before": "student before distillation", "after": "student after TIP soft-OR 50 % (seed 0)"}
    for axis, (name, panel) in zip(axes, record["panels"].items()):
        # The small quadrants are drawn last and larger, so the big ones do not hide them.
        for q in (1, 4, 2, 3):
            xs = [h for h, quadrant in zip(panel["entropy"], panel["quadrant"]) if quadrant == q]
            ys = [d for d, quadrant in zip(panel["reverse_kl"], panel["quadrant"]) if quadrant == q]
            share = 100 * panel["quadrant_shares"][q - 1]
            axis.scatter([max(x, 1e-6) for x in xs], [max(y, 1e-6) for y in ys], s=6 if q in (1, 4) else 14,
                         alpha=0.6, color=QUADRANT_COLORS[q], label=f"{QUADRANT_NAMES[q]}: {share:.1f} %")
        axis.axvline(max(panel["median_entropy"], 1e-6), color="black", linewidth=0.7, linestyle="--")
        axis.axhline(max(panel["median_reverse_kl"], 1e-6), color="black", linewidth=0.7, linestyle="--")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("normalised student entropy h = H(S) / ln|V| (log scale)")
        axis.set_ylabel("reverse KL δ = KL(S || T) (nats, log scale)")
        axis.set_title(f"{titles[name]}: {panel['tokens']} tokens", fontsize=10)
        # Tokens lie along the diagonal on log-log axes: the lower right corner is empty.
        axis.legend(fontsize=7, loc="lower right")
    fig.suptitle("Completion tokens of 64 sampled student rollouts (T = 1), split at the batch medians (dashed)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tip_section(variants: dict, figures: str) -> str:
    records = [r for records in variants.values() for r in records]
    settings = records[0]["settings"]
    return "\n\n".join([
        f"Settings: {settings['max_steps']} optimiser steps × {settings['per_device_train_batch_size']} student "
        f"rollouts, lr {_lr(settings['learning_rate'])} ({settings['lr_scheduler_type']} decay, "
        f"{settings['warmup_steps']} warm-up steps), T = {settings['temperature']:g}, reverse KL; greedy accuracy on "
        f"the {records[0]['eval']['num_problems']} {records[0]['settings']['eval_split']} problems. "
        f"Student before: {100 * records[0]['student_before']:.1f} %, teacher: {100 * records[0]['teacher']:.1f} %.",
        _accuracy_table("tip", variants),
        _differences("tip", variants),
        f"![TIP variants against all-token OPD]({figures}/tip.png)",
        _commands("tip", variants),
        f"Cost: {_run_totals(records)}.",
    ])


PASS_RATE_BINS = {"0": "p = 0", "0_25": "0 < p ≤ ¼", "25_50": "¼ < p ≤ ½", "50_75": "½ < p ≤ ¾",
                  "75_100": "¾ < p < 1", "1": "p = 1", "unknown": "unknown"}


def _paced_section(variants: dict, figures: str) -> str:
    records = [r for records in variants.values() for r in records]
    settings = records[0]["settings"]
    estimation = [r["estimation_cpu_seconds"] for r in records]
    histogram = records[0]["pass_rate_histogram"]
    shares = ", ".join(f"{PASS_RATE_BINS[key]}: {100 * value:.1f} %" for key, value in histogram.items()
                       if key in PASS_RATE_BINS and value > 0)
    return "\n\n".join([
        f"Settings: the first {settings['num_train_problems']} training problems, pass rates from "
        f"K = {settings['pass_rate_rollouts']} student rollouts each (estimated once, before training), then "
        f"{settings['max_steps']} optimiser steps × {settings['per_device_train_batch_size']} rollouts, "
        f"lr {_lr(settings['learning_rate'])} ({settings['lr_scheduler_type']} decay, {settings['warmup_steps']} "
        f"warm-up steps), T = {settings['temperature']:g}. `forward_then_reverse` trains on the dataset's reference "
        "completions with forward KL for the first half, then on student rollouts with reverse KL. The unweighted "
        "baseline is the same trainer with α = β = 0. Train time includes the pass-rate estimation "
        f"({_pm(estimation, digits=1)} s of CPU time); the estimation is needed by PACED only, the unweighted run "
        "pays it because the same trainer does the work. Estimated pass rates "
        f"(seed {records[0]['settings']['seed']}): "
        f"{shares}.",
        _accuracy_table("paced", variants),
        _differences("paced", variants),
        f"![PACED against unweighted distillation]({figures}/paced.png)",
        _commands("paced", variants),
        f"Cost: {_run_totals(records)}.",
    ])


def _opsdc_section(variants: dict, figures: str) -> str:
    records = [r for records in variants.values() for r in records]
    settings = records[0]["settings"]
    lines = [
        "| variant | test accuracy before (%) | the teacher's view: with the instruction (%) "
        "| test accuracy after (%) | completion tokens before | with the instruction | after | train CPU time (s) "
        "| peak RSS in training (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in _ordered("opsdc", variants):
        rs = variants[name]
        lines.append(
            f"| {spec_of('opsdc')['variants'][name]['label']} "
            f"| {_pm([r['before']['accuracy'] for r in rs], 100)} "
            f"| {_pm([r['teachers_view']['accuracy'] for r in rs], 100)} "
            f"| {_pm([r['eval']['accuracy'] for r in rs], 100)} "
            f"| {_pm([r['before']['mean_completion_tokens'] for r in rs])} "
            f"| {_pm([r['teachers_view']['mean_completion_tokens'] for r in rs])} "
            f"| {_pm([r['eval']['mean_completion_tokens'] for r in rs])} "
            f"| {_pm([r['train_cpu_seconds'] for r in rs], digits=1)} "
            f"| {_pm([r['peak_rss_mib'] for r in rs], digits=0)} |"
        )
    return "\n\n".join([
        f"Settings: the built-in *teacher* ({100 * records[0]['teacher']:.1f} % test accuracy) self-distils: "
        f"{settings['max_steps']} optimiser "
        f"steps × {settings['per_device_train_batch_size']} prompts (one rollout each, T = "
        f"{settings['temperature']:g}), lr {_lr(settings['learning_rate'])} constant, weight decay 0.01, reverse KL, "
        f"instruction before the problem. The curves are greedy accuracy and length on the first "
        f"{settings['curve_problems']} validation problems every {settings['curve_every']} steps (their time is "
        "excluded from the train time); the table is on the test split. \"The teacher's view\" is the model before "
        "training with the instruction in its prompt: what the student is distilled towards.",
        "\n".join(lines),
        f"![OPSDC: accuracy and length over training]({figures}/opsdc.png)",
        _commands("opsdc", variants),
        f"Cost: {_run_totals(records)}.",
    ])


def _ace_section(variants: dict, figures: str) -> str:
    records = [r for records in variants.values() for r in records]
    settings = records[0]["settings"]
    names = _ordered("ace", variants)
    ks = [1, 2, 4, 8, 16]
    ks = [k for k in ks if str(k) in records[0]["pass_at_k"]["pass_at_k"]]
    lines = [
        "| run | " + " | ".join(f"pass@{k} (%)" for k in ks) + " | greedy accuracy (%) | mean completion tokens "
        "(sampled) | train CPU time (s) | train wall time (s) | peak RSS in training (MiB) |",
        "|---|" + "---:|" * (len(ks) + 5),
    ]

    def cells(measured):
        return " | ".join(_pm([m["pass_at_k"][str(k)] for m in measured], 100) for k in ks)

    before = [r["before_pass_at_k"] for r in variants[names[0]]]
    lines.append(f"| student before | {cells(before)} | {100 * records[0]['student_before']:.1f} "
                 f"| {_pm([m['mean_completion_tokens'] for m in before])} | | | |")
    for name in names:
        rs = variants[name]
        lines.append(
            f"| {spec_of('ace')['variants'][name]['label']} | {cells([r['pass_at_k'] for r in rs])} "
            f"| {_pm([r['eval']['accuracy'] for r in rs], 100)} "
            f"| {_pm([r['pass_at_k']['mean_completion_tokens'] for r in rs])} "
            f"| {_pm([r['train_cpu_seconds'] for r in rs], digits=1)} "
            f"| {_pm([r['train_seconds'] for r in rs], digits=0)} "
            f"| {_pm([r['peak_rss_mib'] for r in rs], digits=0)} |"
        )
    differences = []
    baseline = spec_of("ace")["baseline"]
    if baseline in variants:
        base = {r["settings"]["seed"]: r["pass_at_k"]["pass_at_k"] for r in variants[baseline]}
        differences = ["| variant | " + " | ".join(f"Δ pass@{k} (points)" for k in ks) + " |",
                       "|---|" + "---:|" * len(ks)]
        for name in names:
            if name == baseline:
                continue
            paired = [r for r in variants[name] if r["settings"]["seed"] in base]
            row = " | ".join(_pm([100 * (r["pass_at_k"]["pass_at_k"][str(k)] - base[r["settings"]["seed"]][str(k)])
                                  for r in paired]) for k in ks)
            differences.append(f"| {spec_of('ace')['variants'][name]['label']} − GRPO | {row} |")
    # What ACE did: the logged distributions of c and of the factor, averaged over the training steps of each seed.
    acting = []
    logged = [name for name in names
              if all(key in r.get("history", {}) for r in variants[name] for key in ACE_LOGGED)]
    if logged:
        acting = ["| run | c: p10 | c: p50 | c: p90 | c: max | factor on wrong rollouts: mean | p50 | p90 | max |",
                  "|---|" + "---:|" * 8]
        for name in logged:
            def over_steps(key):
                return _pm([sum(v for _, v in r["history"][key]) / len(r["history"][key]) for r in variants[name]],
                           digits=2)
            acting.append(f"| {spec_of('ace')['variants'][name]['label']} | "
                          + " | ".join(over_steps(key) for key in ACE_LOGGED if key != "ace/confidence_shift_mean")
                          + " |")
    origin = ("the settings of `examples/ace_grpo.py`" if _ACTIVE_TASK[0] == "arithmetic" else
              "the loss, β and learning rate of `examples/ace_grpo.py`; steps and batch are the lab's")
    return "\n\n".join([
        f"Settings: the built-in *student* (the teacher solves nearly every sample, so its GRPO groups would carry no "
        f"signal), {settings['max_steps']} optimiser steps × {settings['per_device_train_batch_size']} rollouts "
        f"({settings['per_device_train_batch_size'] // settings['num_generations']} prompts × "
        f"{settings['num_generations']}), math reward, loss `{settings['loss_type']}`, β = {settings['beta']:g}, lr "
        f"{_lr(settings['learning_rate'])} {settings['lr_scheduler_type']}, T = {settings['temperature']:g} "
        f"({origin}). pass@k is the unbiased estimator over {settings['eval_samples']} samples per test problem at "
        f"T = {settings['temperature']:g}, the sampling seeded with the run's seed, so both methods of a seed are scored "
        f"on the same random stream; pass@1 equals mean@{settings['eval_samples']}.",
        "\n".join(lines),
        "\n".join(differences),
        *(["What ACE did, from its logged metrics (each a per-step statistic over the step's rollouts, averaged over "
           "the training steps, then mean ± std over seeds; c in nats per rollout):", "\n".join(acting)]
          if acting else []),
        f"![pass@k of GRPO and ACE-GRPO]({figures}/ace.png)",
        _commands("ace", variants),
        f"Cost: {_run_totals(records)}.",
    ])


def _bridge_section(variants: dict, figures: str) -> str:
    records = [r for records in variants.values() for r in records]
    settings = records[0]["settings"]
    n = settings["eval_samples"]
    lines = [f"| model | greedy accuracy (%) | mean@{n} (%) | pass@{n} (%) | mean completion tokens (greedy) "
             "| train CPU time (s) | train wall time (s) | peak RSS in training (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for _, label, tests, costs in _bridge_rows(variants):
        cost_cells = "| | | |" if costs is None else (
            f"| {_pm([c['train_cpu_seconds'] for c in costs], digits=1)} "
            f"| {_pm([c['train_seconds'] for c in costs], digits=0)} "
            f"| {_pm([c['peak_rss_mib'] for c in costs], digits=0)} |")
        lines.append(f"| {label} | {_pm([t['greedy_accuracy'] for t in tests], 100)} "
                     f"| {_pm([t['mean_accuracy'] for t in tests], 100)} "
                     f"| {_pm([t['pass_at_k'][str(n)] for t in tests], 100)} "
                     f"| {_pm([t['greedy_mean_completion_tokens'] for t in tests])} {cost_cells}")
    totals = ["| run | train CPU time, all stages (s) | train wall time, all stages (s) |", "|---|---:|---:|"]
    for name in _ordered("bridge", variants):
        rs = variants[name]
        totals.append(f"| {spec_of('bridge')['variants'][name]['label']} "
                      f"| {_pm([r['train_cpu_seconds'] for r in rs], digits=1)} "
                      f"| {_pm([r['train_seconds'] for r in rs], digits=0)} |")
    differences = []
    baseline = spec_of("bridge")["baseline"]
    if baseline in variants:
        base = {r["settings"]["seed"]: r for r in variants[baseline]}
        differences = ["| comparison | greedy (points) | mean@{0} (points) | pass@{0} (points) |".format(n),
                       "|---|---:|---:|---:|"]
        for name in _ordered("bridge", variants):
            if name == baseline:
                continue
            paired = [(r, base[r["settings"]["seed"]]) for r in variants[name] if r["settings"]["seed"] in base]
            cells = [
                _pm([100 * (a["eval"]["accuracy"] - b["eval"]["accuracy"]) for a, b in paired]),
                _pm([100 * (a["sampled"]["mean_accuracy"] - b["sampled"]["mean_accuracy"]) for a, b in paired]),
                _pm([100 * (a["sampled"]["pass_at_k"][str(n)] - b["sampled"]["pass_at_k"][str(n)])
                     for a, b in paired]),
            ]
            differences.append(f"| {spec_of('bridge')['variants'][name]['label']} − "
                               f"{spec_of('bridge')['variants'][baseline]['label']} | {' | '.join(cells)} |")
        if len(differences) == 2:
            differences = []
    grpo = spec_of("bridge")["variants"]["student_grpo"]
    grpo_settings = variants[baseline][0]["settings"] if baseline in variants else {**settings, **grpo}
    return "\n\n".join([
        f"Settings: `examples/bridge.py` on the first {settings['num_train_problems']} training problems, "
        f"{settings['per_device_train_batch_size']} sequences per step, T = {settings['temperature']:g}. The bridge: "
        f"teacher GRPO {settings['teacher_rl_max_steps']} steps (lr {_lr(settings['teacher_rl_learning_rate'])}), "
        f"forward-KL warm-up on teacher-written responses {settings['warmup_max_steps']} steps (lr "
        f"{_lr(settings['warmup_learning_rate'])}), OPD {settings['opd_max_steps']} steps (lr "
        f"{_lr(settings['opd_learning_rate'])}). Direct student GRPO: {grpo_settings.get('max_steps')} steps "
        f"({settings['per_device_train_batch_size'] // settings['num_generations']} prompts × "
        f"{settings['num_generations']} rollouts, lr {_lr(grpo_settings.get('learning_rate'))}). Every model is "
        f"evaluated by the pipeline: greedy, then mean@{n} / pass@{n} from {n} samples per test problem at T = "
        f"{settings['temperature']:g}, the sampling seeded with the run's seed.",
        "\n".join(lines),
        "\n".join(totals),
        "\n".join(differences),
        f"![The bridge against direct student GRPO]({figures}/bridge.png)",
        _commands("bridge", variants),
        f"Cost: {_run_totals(records)}.",
    ])


def _taxonomy_section(variants: dict, figures: str) -> str:
    record = variants["soft_or_50"][0]
    lines = ["| rollouts of | tokens | Q1 high h, high δ | Q2 high h, low δ | Q3 low h, high δ | Q4 low h, low δ |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, panel in record["panels"].items():
        shares = " | ".join(f"{100 * s:.1f} % (soft-OR 50 % keeps {100 * k:.0f} %)"
                            for s, k in zip(panel["quadrant_shares"], panel["soft_or_kept_by_quadrant"]))
        lines.append(f"| student {name} TIP soft-OR 50 % | {panel['tokens']} | {shares} |")
    return "\n\n".join([
        "\n".join(lines),
        f"![Student tokens on the entropy x divergence plane]({figures}/taxonomy.png)",
        _commands("taxonomy", variants),
    ])


def _levels_of(variants: dict) -> list[str]:
    first = next(iter(variants.values()))[0]
    return sorted(first["eval"]["levels"], key=int)


def _levels_table(method: str, variants: dict) -> str:
    """The lab's per-level view: greedy accuracy (%) and mean completion tokens of each variant at each level."""
    levels = _levels_of(variants)
    header = "| variant | " + " | ".join(f"level {level}: accuracy (%) | tokens" for level in levels) + " |"
    lines = [header, "|---|" + "---:|" * (2 * len(levels))]
    rows = []
    if method == "opsdc":
        name = _ordered(method, variants)[0]
        rows.append(("before training (every variant)", [r["before"] for r in variants[name]]))
        for name in _ordered(method, variants):
            rows.append((f"{spec_of(method)['variants'][name]['label']}: the teacher's view",
                         [r["teachers_view"] for r in variants[name]]))
    for name in _ordered(method, variants):
        rows.append((spec_of(method)["variants"][name]["label"], [r["eval"] for r in variants[name]]))
    for label, measured in rows:
        cells = []
        for level in levels:
            cells.append(_pm([m["levels"][level]["accuracy"] for m in measured], 100))
            cells.append(_pm([m["levels"][level]["mean_completion_tokens"] for m in measured]))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot_levels(method: str, variants: dict, path: Path) -> None:
    """Per-level bars: greedy accuracy and mean completion tokens of each variant (mean ± std over seeds)."""
    plt = _plt()
    names = _ordered(method, variants)
    levels = _levels_of(variants)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        records = variants[name]
        xs = [i + (index - (len(names) - 1) / 2) * width for i in range(len(levels))]
        for axis, key, scale in ((left, "accuracy", 100), (right, "mean_completion_tokens", 1)):
            stats = [mean_std([scale * r["eval"]["levels"][level][key] for r in records]) for level in levels]
            axis.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=2,
                     label=spec_of(method)["variants"][name]["label"])
    for axis, title in ((left, "greedy test accuracy (%)"), (right, "mean completion tokens")):
        axis.set_xticks(range(len(levels)), [f"level {level}" for level in levels])
        axis.set_title(title, fontsize=10)
    left.set_ylim(0, 105)
    left.legend(fontsize=7)
    fig.suptitle(f"{spec_of(method)['title']}, by level (lab; mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_opsdc_levels(variants: dict, path: Path) -> None:
    """OPSDC on the lab: mean completion tokens (top) and accuracy (bottom) per level over training, per variant."""
    plt = _plt()
    names = _ordered("opsdc", variants)
    levels = sorted(variants[names[0]][0]["curve"][0][3], key=int)
    fig, axes = plt.subplots(2, len(levels), figsize=(3 * len(levels), 5.5), sharex=True)
    for name in names:
        records = variants[name]
        steps = [point[0] for point in records[0]["curve"]]
        for column, level in enumerate(levels):
            for row, (field, scale) in enumerate(((1, 1), (0, 100))):
                means = [mean_std([scale * r["curve"][i][3][level][field] for r in records])[0]
                         for i in range(len(steps))]
                axes[row][column].plot(steps, means, marker="o", markersize=2,
                                       label=spec_of("opsdc")["variants"][name]["label"])
            axes[0][column].set_title(f"level {level}", fontsize=10)
    axes[0][0].set_ylabel("mean completion tokens")
    axes[1][0].set_ylabel("greedy accuracy (%)")
    for axis in axes[1]:
        axis.set_xlabel("optimiser step")
        axis.set_ylim(-3, 103)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("OPSDC on the lab: length and accuracy per level over training (validation, mean over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LEVEL_PLOTS = {"tip": lambda v, p: plot_levels("tip", v, p), "paced": lambda v, p: plot_levels("paced", v, p),
               "opsdc": plot_opsdc_levels}
LEVEL_TABLES = ("tip", "paced", "opsdc", "ace")


SECTIONS = {"tip": _tip_section, "paced": _paced_section, "opsdc": _opsdc_section, "ace": _ace_section,
            "bridge": _bridge_section, "taxonomy": _taxonomy_section}
PLOTS = {"tip": lambda v, p: plot_bars("tip", v, p), "paced": lambda v, p: plot_bars("paced", v, p),
         "opsdc": plot_opsdc, "ace": plot_ace, "bridge": plot_bridge,
         "taxonomy": lambda v, p: plot_taxonomy(v["soft_or_50"][0], p)}


def _marker(method: str, end: str) -> str:
    return f"<!-- reproduce:{method}:{end} -->"


def _section_pattern(method: str) -> re.Pattern:
    return re.compile(re.escape(_marker(method, "start")) + ".*?" + re.escape(_marker(method, "end")), re.DOTALL)


def render(out: Path = DEFAULT_OUT, doc: Path = DEFAULT_DOC, figures: Path = DEFAULT_FIGURES) -> list[Path]:
    """
    Write each method's generated section of `doc` (between its `<!-- reproduce:<method>:start/end -->` markers, or
    `<!-- reproduce:lab-<method>:start/end -->` for the lab) and its figures under `figures` (the lab's under
    `figures/lab`), from the results under `out` (the lab's under `out/lab`). A doc without a method's markers gets the
    section appended; methods without results keep their section as it is. Returns the figures written.
    """
    doc, figures = Path(doc), Path(figures)
    text = doc.read_text() if doc.exists() else "# Results on the built-in tasks\n"
    written = []
    for task in TASKS:
        with active_task(task):
            text = _render_task(task, load_results(task_out(out, task)), text, doc,
                                figures / "lab" if task == "lab" else figures, written)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return written


def _render_task(task: str, results: dict, text: str, doc: Path, figures: Path, written: list) -> str:
    prefix = "lab-" if task == "lab" else ""
    relative = os.path.relpath(figures, doc.parent)
    all_records = []
    for method in SECTIONS:
        if method not in results:
            continue
        figures.mkdir(parents=True, exist_ok=True)
        variants = results[method]
        all_records += [r for records in variants.values() for r in records]
        figure = figures / f"{method}.png"
        PLOTS[method](variants, figure)
        written.append(figure)
        if task == "lab" and method in LEVEL_PLOTS:
            LEVEL_PLOTS[method](variants, figures / f"{method}_levels.png")
            written.append(figures / f"{method}_levels.png")
        marker = prefix + method
        section = SECTIONS[method](variants, relative)
        if task == "lab" and method in LEVEL_TABLES:
            section += "\n\nBy level (test split):\n\n" + _levels_table(method, variants)
            if method in LEVEL_PLOTS:
                section += f"\n\n![{spec_of(method)['title']}, by level]({relative}/{method}_levels.png)"
        body = f"{_marker(marker, 'start')}\n\n{section}\n\n{_marker(marker, 'end')}"
        pattern = _section_pattern(marker)
        if pattern.search(text):
            text = pattern.sub(lambda _: body, text)
        else:
            title = f"The lab: {spec_of(method)['title']}" if task == "lab" else spec_of(method)["title"]
            text = text.rstrip("\n") + f"\n\n## {title}\n\n{body}\n"
    if all_records:
        marker = prefix + "total"
        scope = "All results of the lab above" if task == "lab" else "All results above"
        body = (f"{_marker(marker, 'start')}\n\n{scope}: {_run_totals(all_records)} (sums over the runs; "
                f"torch {all_records[0]['torch']}).\n\n{_marker(marker, 'end')}")
        pattern = _section_pattern(marker)
        text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip("\n") + f"\n\n{body}\n"
    return text


# --- command line --------------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for method in (*RUN_METHODS, "all"):
        sub = commands.add_parser(method, help=f"run {'every method' if method == 'all' else method}, then render")
        if method != "all":
            names = list(dict.fromkeys([*ARITHMETIC_METHODS[method]["variants"], *LAB_METHODS[method]["variants"]]))
            sub.add_argument("--variants", nargs="+", choices=names, default=None,
                             help="variants to run (default: every variant the task has)")
        sub.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
        default_task = "both" if method == "all" else "arithmetic"
        sub.add_argument("--task", choices=[*TASKS, "both"], default=default_task,
                         help=f"the built-in task: the addition task, the lab (refused while its preconditions do "
                         f"not hold, see docs/lab_task.md), or both (default: {default_task})")
        sub.add_argument("--out", default=str(DEFAULT_OUT), help="directory of the per-run JSON results")
        sub.add_argument("--eval-split", choices=["test", "validation"], default="test",
                         help="split the final accuracy is measured on ('validation' to set budgets)")
        sub.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
        sub.add_argument("--max-steps", type=int, default=None,
                         help="override the method's optimiser steps (to set budgets on the validation split)")
        sub.add_argument("--learning-rate", type=float, default=None,
                         help="override the learning rate of the trained model (to set it on the validation split)")
        sub.add_argument("--force", action="store_true", help="rerun even when a current result exists")
        sub.add_argument("--no-render", action="store_true", help="do not rewrite docs/results.md and the figures")
    sub = commands.add_parser("render", help="rewrite docs/results.md and docs/results/*.png from the results")
    sub.add_argument("--out", default=str(DEFAULT_OUT))
    sub.add_argument("--doc", default=str(DEFAULT_DOC))
    sub.add_argument("--figures", default=str(DEFAULT_FIGURES))
    sub = commands.add_parser("_worker")  # one run, in a fresh process
    sub.add_argument("--method", choices=RUN_METHODS, required=True)
    sub.add_argument("--task", choices=TASKS, default="arithmetic")
    sub.add_argument("--variant", required=True)
    sub.add_argument("--seed", type=int, required=True)
    sub.add_argument("--out", required=True)
    sub.add_argument("--eval-split", default="test")
    sub.add_argument("--max-steps", type=int, default=None)
    sub.add_argument("--learning-rate", type=float, default=None)
    return parser


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    if args.command == "_worker":
        worker(args)
        return
    if args.command == "render":
        for figure in render(Path(args.out), Path(args.doc), Path(args.figures)):
            print(f"wrote {figure}")
        return
    overrides = {"max_steps": args.max_steps, "learning_rate": args.learning_rate}
    methods = RUN_METHODS if args.command == "all" else (args.command,)
    tasks = TASKS if args.task == "both" else (args.task,)
    wall = 0.0
    for task in tasks:
        if task == "lab":
            seeded = seed_lab_cache()
            if seeded is not None:
                print(f"the lab: the pair shipped under {SHIPPED_LAB.relative_to(ROOT)} copied to {seeded} (to "
                      "prepare one on this machine instead: python -m trl_tip.tasks --task lab --force)")
        with active_task(task):
            out = task_out(Path(args.out), task)
            runs = []
            for method in methods:
                variants = list(spec_of(method)["variants"])
                if args.command != "all" and args.variants:
                    unknown = [name for name in args.variants if name not in variants]
                    if unknown:
                        raise SystemExit(f"{method} has no variant {unknown} on the {task} task; it has {variants}.")
                    variants = args.variants
                if method == "taxonomy":
                    # It reads the student after the TIP run it pictures.
                    runs += pending_runs("tip", [spec_of("taxonomy")["settings"]["tip_run"]], [0], out,
                                         args.eval_split, False, overrides)
                runs += pending_runs(method, variants, args.seeds, out, args.eval_split, args.force, overrides)
            runs = list(dict.fromkeys(runs))
            # The taxonomy run needs the TIP run it pictures: run it last.
            runs.sort(key=lambda run: run[0] == "taxonomy")
            print(f"{len(runs)} run(s) to do on the {task} task in {out}")
            taxonomy = [run for run in runs if run[0] == "taxonomy"]
            wall += execute([run for run in runs if run[0] != "taxonomy"], out, args.eval_split, args.jobs,
                            overrides)
            wall += execute(taxonomy, out, args.eval_split, args.jobs, overrides)
    print(f"wall time {wall / 60:.1f} min")
    if not args.no_render and Path(args.out).resolve() == DEFAULT_OUT.resolve():
        for figure in render(Path(args.out)):
            print(f"wrote {figure}")


if __name__ == "__main__":
    main()
