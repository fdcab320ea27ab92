"""
`benchmarks/reproduce.py render`: the generated sections of `docs/results.md` (tables, differences paired by seed, the
commands that reproduce each row) and its figures, from the stored results.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from .plots import LEVEL_PLOTS, PLOTS
from .claims import claim_rows, paired_direction
from .results import (
    _bridge_rows,
    _interval,
    _levels_of,
    _lr,
    _number,
    _ordered,
    _pm,
    _seeds,
    better_equal_worse,
    load_results,
    mean_std,
    verdict,
)
from .settings import (
    _ACTIVE_TASK,
    ACE_LOGGED,
    DEFAULT_DOC,
    DEFAULT_FIGURES,
    DEFAULT_OUT,
    SCRIPT,
    TASKS,
    active_task,
    row_command,
    spec_of,
    task_out,
)


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
    order): the mean difference, its 95 % t-interval, the seeds above / at / below the reference, and the verdict of
    the page's rule where the comparison is one of the papers' claims (in that claim's direction).
    """
    spec = spec_of(method)
    pairs = [(name, spec["baseline"]) for name in _ordered(method, variants) if name != spec["baseline"]]
    pairs += spec.get("comparisons", [])
    labels = spec["variants"]
    lines = ["| comparison | accuracy difference, paired by seed (points) | 95 % interval (points) "
             "| seeds better / equal / worse | verdict (a paper's claim) |",
             "|---|---:|---:|---:|---|"]
    for name, reference in pairs:
        if name not in variants or reference not in variants:
            continue
        base = {r["settings"]["seed"]: r["eval"]["accuracy"] for r in variants[reference]}
        deltas = [100 * (r["eval"]["accuracy"] - base[r["settings"]["seed"]]) for r in variants[name]
                  if r["settings"]["seed"] in base]
        if not deltas:
            continue
        direction = paired_direction(_ACTIVE_TASK[0], method, name, reference)
        judged = "" if direction is None else verdict([-d for d in deltas] if direction == "lower" else deltas,
                                                      direction)
        lines.append(f"| {labels[name]['label']} − {labels[reference]['label']} | {_number(mean_std(deltas)[0])} "
                     f"| {_interval(deltas)} | {' / '.join(map(str, better_equal_worse(deltas)))} "
                     f"| {f'**{judged}**' if judged else ''} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _paired_cell(deltas: list[float]) -> str:
    """A paired difference's mean and its 95 % t-interval."""
    return f"{_number(mean_std(deltas)[0])} {_interval(deltas)}"


def _commands(method: str, variants: dict) -> str:
    lines = [row_command(method, name, sorted(set(_seeds(variants[name]))), variants[name][0]["settings"])
             for name in _ordered(method, variants)]
    return "```bash\n" + "\n".join(lines) + "\n```"


def _run_totals(records: list[dict]) -> str:
    wall = sum(r["process_wall_seconds"] for r in records)
    cpu = sum(r["process_cpu_seconds"] for r in records)
    runs = f"{len(records)} run{'s' if len(records) != 1 else ''}"
    return f"{runs}, {wall / 60:.1f} min of process wall time, {cpu / 60:.1f} min of CPU time"


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


# What the forward-KL phase trains on, by `teacher_completions` (records made before the setting was stored used the
# dataset's reference completions, through "auto").
TEACHER_COMPLETIONS = {"generate": "completions the teacher samples (T as the student's)",
                       "dataset": "the dataset's reference completions", "auto": "the dataset's reference completions"}


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
        f"warm-up steps), T = {settings['temperature']:g}. `forward_then_reverse` trains on "
        f"{TEACHER_COMPLETIONS[settings.get('teacher_completions', 'auto')]} with forward KL for the first half, then "
        "on student rollouts with reverse KL. The unweighted "
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
        differences = ["| variant | " + " | ".join(f"Δ pass@{k}, points [95 % interval]" for k in ks) + " |",
                       "|---|" + "---:|" * len(ks)]
        for name in names:
            if name == baseline:
                continue
            paired = [r for r in variants[name] if r["settings"]["seed"] in base]
            row = " | ".join(_paired_cell([100 * (r["pass_at_k"]["pass_at_k"][str(k)]
                                                  - base[r["settings"]["seed"]][str(k)]) for r in paired]) for k in ks)
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
        differences = ["| comparison | greedy, points [95 % interval] | mean@{0}, points [95 % interval] "
                       "| pass@{0}, points [95 % interval] |".format(n),
                       "|---|---:|---:|---:|"]
        for name in _ordered("bridge", variants):
            if name == baseline:
                continue
            paired = [(r, base[r["settings"]["seed"]]) for r in variants[name] if r["settings"]["seed"] in base]
            cells = [
                _paired_cell([100 * (a["eval"]["accuracy"] - b["eval"]["accuracy"]) for a, b in paired]),
                _paired_cell([100 * (a["sampled"]["mean_accuracy"] - b["sampled"]["mean_accuracy"])
                              for a, b in paired]),
                _paired_cell([100 * (a["sampled"]["pass_at_k"][str(n)] - b["sampled"]["pass_at_k"][str(n)])
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


LEVEL_TABLES = ("tip", "paced", "opsdc", "ace")


CLAIMS_TITLES = {"arithmetic": "The papers' claims at this scale", "lab": "The papers' claims on the lab"}


def _claims_section(task: str, results: dict) -> str:
    """
    The papers' claims on `task` (`claims.CLAIMS`) with the numbers measured here and the verdict of the page's rule;
    claims whose records are missing are listed under the table as awaiting runs.
    """
    rows, awaiting = claim_rows(task, results)
    parts = []
    if rows:
        lines = ["| paper | its claim | measured here | verdict |", "|---|---|---|---|"]
        lines += [f"| {claim.paper} | {claim.text} | {measured.text} | **{measured.verdict}** |"
                  for claim, measured in rows]
        parts.append("\n".join(lines))
    if awaiting:
        listed = "\n".join(f"- {claim.paper}: {claim.text}" for claim in awaiting)
        parts.append(f"Awaiting runs (no records yet, so not in the table; `python {SCRIPT} all --task {task}`):"
                     f"\n\n{listed}")
    return "\n\n".join(parts)


SECTIONS = {"tip": _tip_section, "paced": _paced_section, "opsdc": _opsdc_section, "ace": _ace_section,
            "bridge": _bridge_section, "taxonomy": _taxonomy_section}


def _marker(method: str, end: str) -> str:
    return f"<!-- reproduce:{method}:{end} -->"


def _section_pattern(method: str) -> re.Pattern:
    return re.compile(re.escape(_marker(method, "start")) + ".*?" + re.escape(_marker(method, "end")), re.DOTALL)


def render(out: Path = DEFAULT_OUT, doc: Path = DEFAULT_DOC, figures: Path = DEFAULT_FIGURES) -> list[Path]:
    """
    Write each method's generated section of `doc` (between its `<!-- reproduce:<method>:start/end -->` markers, or
    `<!-- reproduce:lab-<method>:start/end -->` for the lab) and its figures under `figures` (the lab's under
    `figures/lab`), from the results under `out` (the lab's under `out/lab`), and each task's table of the papers'
    claims (`<!-- reproduce:claims:start/end -->`, `<!-- reproduce:lab-claims:start/end -->`). A doc without a
    method's markers gets the section appended; a method without stored results gets a line saying so in place of its
    section (no number stays on the page without a record behind it). Returns the figures written.
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


def render_page(out: Path = DEFAULT_OUT, doc: Path = DEFAULT_DOC, figures: Path = DEFAULT_FIGURES) -> str:
    """
    The text `render` gives `doc` from the results under `out`, rendered into a temporary copy of `doc` (its figures
    in a temporary directory at the same place relative to it); `doc` and `figures` are not touched.
    """
    doc, figures = Path(doc), Path(figures)
    relative = os.path.relpath(figures, doc.parent)
    with tempfile.TemporaryDirectory() as directory:
        copy = Path(directory) / "page" / doc.name
        copy.parent.mkdir()
        if doc.exists():
            shutil.copyfile(doc, copy)
        render(out, copy, copy.parent / relative)
        return copy.read_text()


def _render_task(task: str, results: dict, text: str, doc: Path, figures: Path, written: list) -> str:
    prefix = "lab-" if task == "lab" else ""
    relative = os.path.relpath(figures, doc.parent)
    all_records = []
    for method in SECTIONS:
        if method not in results:
            # A section whose runs are not stored says so, rather than keep numbers no stored record backs.
            pattern = _section_pattern(prefix + method)
            if pattern.search(text):
                command = f"python {SCRIPT} {method}" + (" --task lab" if task == "lab" else "")
                awaiting = f"No stored runs yet: `{command}` makes them and renders this section."
                body = f"{_marker(prefix + method, 'start')}\n\n{awaiting}\n\n{_marker(prefix + method, 'end')}"
                text = pattern.sub(lambda _, body=body: body, text)
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
    if not all_records and _section_pattern(prefix + "total").search(text):
        body = f"{_marker(prefix + 'total', 'start')}\n\nNo stored runs yet.\n\n{_marker(prefix + 'total', 'end')}"
        text = _section_pattern(prefix + "total").sub(lambda _: body, text)
    if all_records:
        marker = prefix + "total"
        scope = "All results of the lab above" if task == "lab" else "All results above"
        body = (f"{_marker(marker, 'start')}\n\n{scope}: {_run_totals(all_records)} (sums over the runs; "
                f"torch {all_records[0]['torch']}).\n\n{_marker(marker, 'end')}")
        pattern = _section_pattern(marker)
        text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip("\n") + f"\n\n{body}\n"
    # The papers' claims, judged from every method's results: rendered wherever the page has their markers (claims
    # whose runs are missing are listed as awaiting them), appended when the page has none and the task has results.
    marker = prefix + "claims"
    body = f"{_marker(marker, 'start')}\n\n{_claims_section(task, results)}\n\n{_marker(marker, 'end')}"
    pattern = _section_pattern(marker)
    if pattern.search(text):
        text = pattern.sub(lambda _: body, text)
    elif all_records:
        text = text.rstrip("\n") + f"\n\n## {CLAIMS_TITLES[task]}\n\n{body}\n"
    return text
