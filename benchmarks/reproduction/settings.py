"""
What `benchmarks/reproduce.py` runs: each method's settings and variants on the addition task and on the lab, the
task being run, and what identifies a run (its settings, where its result lives, the command that reproduces it).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from common import ROOT


# The records are committed next to the page they produce (docs/results.md); what a run keeps besides its record (its
# log, the student the taxonomy reads) is ignored by git (.gitignore).
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "reproduce"
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
    # The forward-KL phase of forward_then_reverse distils the teacher's own sampled responses, as the paper does.
    "teacher_completions": "generate",
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
LAB_PACED_SETTINGS = {**LAB_TIP_SETTINGS, "num_train_problems": 400, "pass_rate_rollouts": 8,
                      "teacher_completions": PACED_SETTINGS["teacher_completions"]}
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


# ACEGRPOTrainer's logged distributions of the confidence shift c and of the factor on wrong rollouts.
ACE_LOGGED = ("ace/confidence_shift_mean", "ace/confidence_shift_p10", "ace/confidence_shift_p50",
              "ace/confidence_shift_p90", "ace/confidence_shift_max", "ace/scale_factor_mean", "ace/scale_factor_p50",
              "ace/scale_factor_p90", "ace/scale_factor_max")
