"""The figures of `docs/results.md` (matplotlib, written as PNG)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .results import _bridge_rows, _levels_of, _ordered, mean_std
from .settings import spec_of


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


PLOTS = {"tip": lambda v, p: plot_bars("tip", v, p), "paced": lambda v, p: plot_bars("paced", v, p),
         "opsdc": plot_opsdc, "ace": plot_ace, "bridge": plot_bridge,
         "taxonomy": lambda v, p: plot_taxonomy(v["soft_or_50"][0], p)}
