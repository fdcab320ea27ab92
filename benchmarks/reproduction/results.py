"""The stored results of `benchmarks/reproduce.py` and the statistics its tables and figures share."""

from __future__ import annotations

import math
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


# Student-t quantiles t_{0.975, df}: the half-width of a 95 % interval of a mean is t_{0.975, n − 1} · s / √n. A df
# between two rows reads the smaller df's quantile (the wider interval); beyond the last row, the last row's.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
         21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
         40: 2.021, 60: 2.000, 120: 1.980}


def t_975(df: int) -> float:
    """t_{0.975, df} from `T_975` (df ≥ 1)."""
    if df < 1:
        raise ValueError(f"a t quantile needs at least one degree of freedom, got {df}.")
    return T_975[max(key for key in T_975 if key <= df)]


def mean_interval(values: list[float]) -> tuple[float, float | None, float | None]:
    """
    The mean of `values` and its 95 % Student-t interval (lo, hi) = mean ∓ t_{0.975, n − 1} · s / √n, s the sample
    standard deviation; (mean, None, None) for a single value, which has no interval.
    """
    mean, std = mean_std(values)
    if len(values) < 2:
        return mean, None, None
    half = t_975(len(values) - 1) * std / math.sqrt(len(values))
    return mean, mean - half, mean + half


HOLDS, FAILS, NOISE, NOT_TESTABLE = "holds", "does not hold", "within noise", "not testable"
DIRECTIONS = ("higher", "lower", "no worse")


def verdict(differences: list[float], direction: str = "higher") -> str | None:
    """
    The page's one verdict rule, for a claim measured as one difference per seed, d_s, already oriented so that the
    claim says d > 0 (for "higher" and "no worse": the measured minus the reference value; for "lower", the reference
    minus the measured one):

    - **holds** when every seed agrees (d_s > 0 for all) and the 95 % paired t-interval of the mean difference lies
      above 0 (its lower bound > 0);
    - **does not hold** when that interval lies below 0 (its upper bound < 0), or when the claim's direction fails on
      every seed: d_s ≤ 0 for all (for a "no worse" claim, where a tie does not fail it, d_s < 0 for all);
    - **within noise** otherwise.

    One seed has no interval, so it never holds (it does not hold when its d fails the direction). `None` without
    differences (nothing measured yet).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
    if not differences:
        return None
    _, lo, hi = mean_interval(differences)
    if lo is not None and lo > 0 and all(d > 0 for d in differences):
        return HOLDS
    fails = (lambda d: d < 0) if direction == "no worse" else (lambda d: d <= 0)
    if (hi is not None and hi < 0) or all(fails(d) for d in differences):
        return FAILS
    return NOISE


def better_equal_worse(differences: list[float], tolerance: float = 1e-9) -> tuple[int, int, int]:
    """How many differences are above, at (within `tolerance`) and below 0."""
    better = sum(d > tolerance for d in differences)
    worse = sum(d < -tolerance for d in differences)
    return better, len(differences) - better - worse, worse


def _number(value: float, digits: int = 1) -> str:
    """A value at `digits` decimals, never "-0.0"."""
    return f"{0.0 if round(value, digits) == 0 else value:.{digits}f}"


def _interval(values: list[float], digits: int = 1) -> str:
    """"[lo, hi]" of the mean's 95 % t-interval, or "no interval (one seed)"."""
    _, lo, hi = mean_interval(values)
    if lo is None:
        return "no interval (one seed)"
    return f"[{_number(lo, digits)}, {_number(hi, digits)}]"


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
