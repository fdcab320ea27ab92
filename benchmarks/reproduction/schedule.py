"""
The driver side of `benchmarks/reproduce.py`: which runs are missing or stale, running them in worker processes a few
at a time, and the shipped lab pair a reproduction starts from.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, load_json, worker_env

from .settings import _ACTIVE_TASK, OVERRIDABLE, SCRIPT, run_path, run_settings


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


# --- running (driver side) -----------------------------------------------------------------------------------------


# What a stored result must hold besides equal settings (results of older versions of this script are rerun).
REQUIRED_KEYS = {"tip": ("eval", "train_cpu_seconds"), "paced": ("eval", "train_cpu_seconds"),
                 "opsdc": ("eval", "train_cpu_seconds", "curve"), "ace": ("eval", "train_cpu_seconds", "pass_at_k"),
                 "bridge": ("eval", "train_cpu_seconds", "stages"), "taxonomy": ("panels",)}


def _is_current(path: Path, settings: dict) -> bool:
    if not path.exists():
        return False
    try:
        record = load_json(path)
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
    env = worker_env(pythonpath=True, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    queue, running, failed = list(runs), [], []
    while queue or running:
        while queue and len(running) < jobs:
            method, variant, seed = queue.pop(0)
            log = run_path(out, method, variant, seed).with_suffix(".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, str(ROOT / SCRIPT), "_worker", "--method", method, "--variant",
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
