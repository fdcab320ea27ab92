"""
Pictures of `trl-tip eval` results: pass@k against k, and accuracy per difficulty level.

Every function reads the `summary.json` that `trl-tip eval` writes (or the same dictionary in memory): `results` maps a
dataset to its summary (`pass_at_k` for k = 1..n, `mean_accuracy`, `num_problems`, `num_samples`, and `by_level`
when the dataset has a `level` column). Several runs (e.g. GRPO and ACE-GRPO) are overlaid on the same axes, which is
the comparison the ACE paper draws. Figures are drawn with matplotlib's object API (no pyplot), so nothing changes the
caller's plotting state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path


SUMMARY_FILE = "summary.json"
PASS_AT_K_FILE = "pass_at_k.png"


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "Plotting `trl-tip eval` results needs matplotlib: `pip install 'trl-tip[plots]'` (or `pip install "
            "matplotlib`)."
        ) from error
    return Figure(figsize=(width, height), layout="constrained")


def read_report(path: str | Path) -> dict:
    """The report of a finished `trl-tip eval` run: its `summary.json`, given the file or the run's directory."""
    path = Path(path)
    file = path / SUMMARY_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"No {SUMMARY_FILE} at {path}: pass the --output_dir of a finished `trl-tip eval` run, or its "
            f"{SUMMARY_FILE}."
        )
    report = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(report, dict) or not isinstance(report.get("results"), dict) or not report["results"]:
        raise ValueError(f"{file} is not a `trl-tip eval` summary: it has no `results` per dataset.")
    return report


def pass_at_k_curve(summary: Mapping) -> tuple[list[int], list[float]]:
    """`(ks, pass@k)` of one dataset's summary, k ascending (JSON keys are strings, in-memory ones integers)."""
    points = sorted((int(k), float(value)) for k, value in summary["pass_at_k"].items())
    return [k for k, _ in points], [value for _, value in points]


def _datasets(runs: Mapping[str, Mapping]) -> list[str]:
    names: list[str] = []
    for report in runs.values():
        names += [name for name in report["results"] if name not in names]
    return names


def short_name(model: str) -> str:
    """A model for a legend: a Hub id as it is (`owner/name`), a local path by its last directory."""
    text = str(model).rstrip("/")
    if text.count("/") > 1 or text.startswith((".", "/", "~")):
        return Path(text).name or text
    return text


def _k_ticks(n: int) -> list[int]:
    return sorted({2**i for i in range(int(math.log2(n)) + 1)} | {n})


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def plot_pass_at_k(runs: Mapping[str, Mapping], path: str | Path, title: str | None = None) -> Path:
    """
    Write [`pass_at_k_figure`] to `path` (PNG); returns the path.
    """
    return _save(pass_at_k_figure(runs, title), path)


def plot_levels(runs: Mapping[str, Mapping], dataset: str, path: str | Path, title: str | None = None) -> Path:
    """
    Write [`levels_figure`] to `path` (PNG); returns the path.
    """
    return _save(levels_figure(runs, dataset, title), path)


def pass_at_k_figure(runs: Mapping[str, Mapping], title: str | None = None):
    """
    pass@k (%) against k (log₂ axis), one panel per dataset, one line per run.

    Args:
        runs (`Mapping[str, Mapping]`): label -> report (`summary.json` content); one entry for a single run.
        title (`str`, *optional*): figure title; default: the model of a single run.

    Returns:
        `matplotlib.figure.Figure`: the figure (one `Axes` per dataset, in the order the runs list them).
    """
    if not runs:
        raise ValueError("Nothing to plot: no runs.")
    datasets = _datasets(runs)
    figure = _figure(5.2 * len(datasets) + 0.4, 4.0)
    axes = figure.subplots(1, len(datasets), squeeze=False)[0]
    for ax, name in zip(axes, datasets, strict=True):
        largest = 1
        shapes = []
        for index, (label, report) in enumerate(runs.items()):
            summary = report["results"].get(name)
            if summary is None:
                continue
            ks, values = pass_at_k_curve(summary)
            largest = max(largest, ks[-1])
            marked = set(_k_ticks(ks[-1]))
            numbers = f"pass@1 {100 * values[0]:.1f}"
            if ks[-1] > 1:
                numbers += f", pass@{ks[-1]} {100 * values[-1]:.1f}"
            # A run keeps its colour in every panel, also where another run is missing.
            ax.plot(ks, [100 * v for v in values], marker="o", markersize=4, color=f"C{index % 10}",
                    markevery=[i for i, k in enumerate(ks) if k in marked], label=f"{label}  ({numbers})")
            shapes.append(f"{summary['num_problems']} problems × {summary['num_samples']} samples")
        ax.set_xscale("log", base=2)
        ticks = _k_ticks(largest)
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.minorticks_off()
        ax.set_xlim(0.9, largest * 1.1)
        ax.set_xlabel("k (samples drawn)")
        ax.set_ylabel("pass@k (%)")
        low, high = ax.get_ylim()
        ax.set_ylim(max(0.0, low - 2), min(100.0, high + 2) if high < 98 else 101.0)
        ax.set_title(f"{name} ({', '.join(dict.fromkeys(shapes))})", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if title is None and len(runs) == 1:
        title = short_name(next(iter(runs.values())).get("model", ""))
    if title:
        figure.suptitle(title, fontsize=11)
    return figure


def levels_figure(runs: Mapping[str, Mapping], dataset: str, title: str | None = None):
    """
    mean@n and pass@n (%) per difficulty level of one dataset, grouped bars, one colour per run.

    Args:
        runs (`Mapping[str, Mapping]`): label -> report; the runs' summaries of `dataset` need `by_level`.
        dataset (`str`): the dataset to plot (a key of the reports' `results`).
        title (`str`, *optional*): figure title; default: the dataset (and the model of a single run).

    Returns:
        `matplotlib.figure.Figure`: two `Axes` (mean@n, pass@n), one bar container per run, bars in level order.
    """
    with_levels = {label: report["results"][dataset]["by_level"] for label, report in runs.items()
                   if "by_level" in report["results"].get(dataset, {})}
    colours = {label: f"C{index % 10}" for index, label in enumerate(runs)}
    if not with_levels:
        raise ValueError(f"No run has per-level results for {dataset!r} (its dataset has no `level` column).")
    levels: list[str] = []
    for by_level in with_levels.values():
        levels += [level for level in by_level if level not in levels]
    figure = _figure(min(16.0, max(6.0, 1.1 * len(levels) * len(with_levels) + 2.5)), 3.8)
    axes = figure.subplots(1, 2, sharey=True)
    width = 0.8 / len(with_levels)
    sizes = {summary["num_samples"] for by_level in with_levels.values() for summary in by_level.values()}
    n = str(sizes.pop()) if len(sizes) == 1 else "n"
    for ax, (metric, heading) in zip(axes, (("mean", f"mean@{n}"), ("best", f"pass@{n}")), strict=True):
        for index, (label, by_level) in enumerate(with_levels.items()):
            xs, heights = [], []
            for position, level in enumerate(levels):
                if level in by_level:
                    summary = by_level[level]
                    _, values = pass_at_k_curve(summary)
                    xs.append(position - 0.4 + width * (index + 0.5))
                    heights.append(100 * (summary["mean_accuracy"] if metric == "mean" else values[-1]))
            bars = ax.bar(xs, heights, width=width * 0.95, label=label, color=colours[label])
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        counts = []
        for level in levels:
            sizes = {by_level[level]["num_problems"] for by_level in with_levels.values() if level in by_level}
            counts.append(f"{level}\n({'/'.join(map(str, sorted(sizes)))})")
        ax.set_xticks(range(len(levels)), counts, fontsize=8)
        ax.set_xlabel("level (problems)")
        ax.set_title(heading, fontsize=10)
        ax.set_ylim(0, 108)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8, loc="upper right")
    if title is None:
        title = dataset if len(runs) > 1 else f"{dataset}: {short_name(next(iter(runs.values())).get('model', ''))}"
    figure.suptitle(title, fontsize=11)
    return figure


def levels_file(dataset: str, prefix: str = "") -> str:
    """File name of a dataset's per-level figure (`/` of a Hub id becomes `__`, as for its JSONL)."""
    return f"{prefix}{dataset.replace('/', '__')}_levels.png"


def write_run_plots(report: Mapping, output_dir: str | Path) -> list[Path]:
    """The figures of one `trl-tip eval` run, next to its `summary.json`: pass@k against k, and per-level bars."""
    label = short_name(report.get("model", "run"))
    runs = {label: report}
    paths = [plot_pass_at_k(runs, Path(output_dir) / PASS_AT_K_FILE)]
    for name, summary in report["results"].items():
        if "by_level" in summary:
            paths.append(plot_levels(runs, name, Path(output_dir) / levels_file(name)))
    return paths


def run_labels(paths: list[str | Path], labels: list[str] | None = None) -> list[str]:
    """Labels of compared runs: the given ones, else each run directory's name (its path when names collide)."""
    if labels is not None:
        if len(labels) != len(paths):
            raise ValueError(f"--labels needs one label per compared run: got {len(labels)} for {len(paths)} runs.")
        return list(labels)
    names = [(Path(p).parent if Path(p).name == SUMMARY_FILE else Path(p)).name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    return names


def compare_runs(paths: list[str | Path], output_dir: str | Path, labels: list[str] | None = None) -> list[Path]:
    """
    Overlay finished `trl-tip eval` runs: `compare_pass_at_k.png`, and `compare_<dataset>_levels.png` for each dataset
    that some run has per-level results for, written to `output_dir`.

    Args:
        paths (`list`): two or more run directories (their `--output_dir`) or `summary.json` files.
        output_dir (`str` or `Path`): where the figures go.
        labels (`list[str]`, *optional*): legend labels, one per run; default: the run directories' names.

    Returns:
        `list[Path]`: the PNGs written.
    """
    if len(paths) < 2:
        raise ValueError(f"Comparing needs at least two runs, got {len(paths)}.")
    names = run_labels(paths, labels)
    if len(set(names)) < len(names):
        raise ValueError(f"Compared runs need distinct labels, got {names}.")
    runs = {name: read_report(path) for name, path in zip(names, paths, strict=True)}
    output_dir = Path(output_dir)
    written = [plot_pass_at_k(runs, output_dir / f"compare_{PASS_AT_K_FILE}", title=" vs ".join(names))]
    for name in _datasets(runs):
        if any("by_level" in report["results"].get(name, {}) for report in runs.values()):
            written.append(plot_levels(runs, name, output_dir / levels_file(name, "compare_")))
    return written


__all__ = [
    "compare_runs",
    "levels_figure",
    "pass_at_k_curve",
    "pass_at_k_figure",
    "plot_levels",
    "plot_pass_at_k",
    "read_report",
    "short_name",
    "write_run_plots",
]
