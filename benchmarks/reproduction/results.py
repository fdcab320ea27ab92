"""The stored results of `benchmarks/reproduce.py` and the statistics its tables and figures share."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path

from common import load_json

from .settings import spec_of


def load_results(out: Path) -> dict:
    """{method: {variant: [record, ...] sorted by seed}} for every JSON under `out`."""
    results = defaultdict(lambda: defaultdict(list))
    for path in sorted(Path(out).glob("*/*/seed*.json")):
        record = load_json(path)
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


def _levels_of(variants: dict) -> list[str]:
    first = next(iter(variants.values()))[0]
    return sorted(first["eval"]["levels"], key=int)
