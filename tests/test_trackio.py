"""
trl_tip's metrics reach trackio: each trainer trains 2 steps with `report_to="trackio"` in local mode (storage in a
temporary directory, no network), and the series trackio stored are read back.

trackio fixes its storage directory (`TRACKIO_DIR`) when it is first imported, so the runs happen in a child process
started with that variable set; run as a script, this file is that child.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PROJECT = "trl_tip-metrics"

# The trl_tip metrics every trainer logs on every training step of the runs below. A name missing from trackio's
# series fails the test, so a metric that stops being logged (or is renamed) is noticed. Others logged under the
# prefix (e.g. `paced/ungradable_problems`, once, with the first step) are checked against the trainer's logs.
EXPECTED = {
    "tip": ["tip/kept_fraction", "tip/entropy_all", "tip/entropy_kept", "tip/divergence_all", "tip/divergence_kept"],
    "paced": [
        "paced/weight_mean",
        "paced/weight_max",
        "paced/zero_weight_share",
        "paced/zero_weight_batches",
        "paced/pass_rate_mean",
        "paced/beta",
        "paced/teacher_rollouts",
        "paced/table_weight_mean",
        "paced/pass_rate_estimates",
    ],
    "opsdc": ["opsdc/teacher_refreshes", "opsdc/compression", "opsdc/accuracy"],
    "ace": [
        "ace/confidence_shift_mean",
        "ace/confidence_shift_min",
        "ace/confidence_shift_p10",
        "ace/confidence_shift_p50",
        "ace/confidence_shift_p90",
        "ace/confidence_shift_max",
        "ace/scaled_fraction",
        "ace/scale_factor_mean",
        "ace/scale_factor_p50",
        "ace/scale_factor_p90",
        "ace/scale_factor_max",
    ],
}
PREFIXES = {"tip": "tip/", "paced": "paced/", "opsdc": "opsdc/", "ace": "ace/"}


def _common(output_dir: Path, run: str) -> dict:
    return {
        "output_dir": str(output_dir / run),
        "max_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "bf16": False,
        "seed": 0,
        "disable_tqdm": True,
        "report_to": "trackio",
        "project": PROJECT,
        "run_name": run,
    }


def train_all(student: str, teacher: str, output_dir: Path) -> dict:
    """
    Train each trainer 2 steps reporting to trackio; returns, per run, `{metric: [(step, value), ...]}` of the trl_tip
    metrics in the trainer's own log history.
    """
    from datasets import Dataset

    from trl_tip import (
        ACEGRPOConfig,
        ACEGRPOTrainer,
        OPSDCConfig,
        OPSDCTrainer,
        PacedConfig,
        PacedTrainer,
        TipDistillConfig,
        TipDistillTrainer,
        math_reward,
    )
    from trl_tip.tasks import build_arithmetic_dataset

    problems = build_arithmetic_dataset()["train"].select(range(8))
    prompts = problems.remove_columns([c for c in problems.column_names if c not in ("prompt", "answer")])

    def diversity_reward(completions, **kwargs):
        # Varies within a group, so GRPO advantages take both signs and ACE rescales some.
        return [len(set(completion[0]["content"])) / 10 for completion in completions]

    trainers = {
        "tip": lambda: TipDistillTrainer(
            model=student, teacher_model=teacher, train_dataset=problems,
            args=TipDistillConfig(per_device_train_batch_size=4, max_completion_length=8,
                                  **_common(output_dir, "tip")),
        ),
        "paced": lambda: PacedTrainer(
            model=student, teacher_model=teacher, train_dataset=problems, reward_funcs=math_reward,
            args=PacedConfig(per_device_train_batch_size=4, max_completion_length=8, pass_rate_rollouts=2,
                             **_common(output_dir, "paced")),
        ),
        "opsdc": lambda: OPSDCTrainer(
            student, train_dataset=prompts, reward_funcs=math_reward,
            args=OPSDCConfig(per_device_train_batch_size=4, max_completion_length=8,
                             concise_instruction="Be brief please.", gradient_checkpointing=False,
                             **_common(output_dir, "opsdc")),
        ),
        "ace": lambda: ACEGRPOTrainer(
            model=student, reward_funcs=diversity_reward,
            train_dataset=Dataset.from_dict({"prompt": prompts["prompt"]}),
            args=ACEGRPOConfig(per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                               **_common(output_dir, "ace")),
        ),
    }
    logged = {}
    for run, build in trainers.items():
        trainer = build()
        trainer.train()
        series: dict[str, list] = {}
        for entry in trainer.state.log_history:
            for key, value in entry.items():
                if key.startswith(PREFIXES[run]):
                    series.setdefault(key, []).append((entry["step"], value))
        logged[run] = series
    return logged


def read_series(run: str) -> dict[str, list]:
    """
    `{metric: [(global_step, value), ...]}` as trackio stored them for `run` of the project. transformers'
    integration logs training metrics as `train/<name>` with the optimiser step as `train/global_step` (trackio's own
    `step` just counts log calls).
    """
    from trackio.sqlite_storage import SQLiteStorage

    series: dict[str, list] = {}
    for entry in SQLiteStorage.get_logs(PROJECT, run):
        for key, value in entry.items():
            if key not in ("step", "timestamp", "train/global_step") and isinstance(value, (int, float)):
                series.setdefault(key, []).append((entry.get("train/global_step"), value))
    return series


def main(student: str, teacher: str, output_dir: str) -> None:
    import trackio.utils

    # The storage is the temporary directory, nothing else: a stray default would leave the test's data in ~/.cache.
    assert Path(trackio.utils.TRACKIO_DIR) == Path(os.environ["TRACKIO_DIR"]), trackio.utils.TRACKIO_DIR
    logged = train_all(student, teacher, Path(output_dir))
    report = {run: {"logged": series, "series": read_series(run)} for run, series in logged.items()}
    Path(output_dir, "report.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def trackio_report(tiny_model_paths, tmp_path_factory):
    base = tmp_path_factory.mktemp("trackio")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TRACKIO_DIR": str(base / "store"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    # Local mode: no Space, no self-hosted server, no bucket, whatever the caller's environment says.
    for name in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, __file__, tiny_model_paths["student"], tiny_model_paths["teacher"], str(base / "runs")],
        env=env, cwd=base, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return json.loads((base / "runs" / "report.json").read_text())


@pytest.mark.parametrize("run", list(EXPECTED))
def test_trl_tip_metrics_reach_trackio_finite(trackio_report, run):
    report = trackio_report[run]
    series = report["series"]
    for name in EXPECTED[run]:
        assert name in report["logged"], f"{name} is no longer in the trainer's logs"
        assert f"train/{name}" in series, f"{name} did not reach trackio; it stored {sorted(series)}"
        assert [step for step, _ in report["logged"][name]] == [1, 2], (name, report["logged"][name])
    # Everything the trainer logged under its prefix reached trackio, at the same steps, with the same finite values.
    for name, logged in report["logged"].items():
        stored = series.get(f"train/{name}")
        assert stored is not None, f"{name} was logged by the trainer but not stored by trackio"
        assert stored == logged, (name, stored, logged)
        assert all(math.isfinite(value) for _, value in stored), (name, stored)


def test_trackio_stores_trl_series_beside_trl_tip_ones(trackio_report):
    # The integration is the stock one: the loss arrives beside the trl_tip metrics, step by step.
    for run in EXPECTED:
        loss = trackio_report[run]["series"]["train/loss"]
        assert [step for step, _ in loss] == [1, 2] and all(math.isfinite(value) for _, value in loss), (run, loss)


if __name__ == "__main__":
    main(*sys.argv[1:4])
