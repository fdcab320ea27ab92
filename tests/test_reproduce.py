"""`benchmarks/reproduce.py render`: the tables' arithmetic, the commands, and the figures, from hand-made results."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("_reproduce", ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["_reproduce"] = module
    spec.loader.exec_module(module)
    return module


def _record(reproduce, method, variant, seed, accuracy, max_steps=None, **extra):
    settings = reproduce.run_settings(method, variant, seed, "test", {"max_steps": max_steps})
    return {
        "settings": settings,
        "command": reproduce.row_command(method, variant, [seed], settings),
        "student_before": 0.393,
        "teacher": 1.0,
        "eval": {"accuracy": accuracy, "mean_completion_tokens": 25.0 + seed, "num_problems": 300},
        "train_seconds": 10.0 * (seed + 1),
        "train_cpu_seconds": 5.0 * (seed + 1),
        "peak_rss_mib": 500.0 + seed,
        "peak_above_loaded_mib": 40.0 + seed,
        "process_wall_seconds": 60.0,
        "process_cpu_seconds": 30.0,
        "torch": "2.13.0+cpu",
        **extra,
    }


def _write(out, record):
    settings = record["settings"]
    path = out / settings["method"] / settings["variant"] / f"seed{settings['seed']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def _test(greedy, sampled):
    return {"greedy_accuracy": greedy, "greedy_mean_completion_tokens": 25.0, "mean_accuracy": sampled,
            "pass_at_k": {str(k): min(1.0, sampled * k) for k in range(1, 17)}, "mean_completion_tokens": 25.0,
            "num_problems": 300}


@pytest.fixture()
def results(tmp_path, reproduce):
    out = tmp_path / "runs"
    for seed, (base, soft_or) in enumerate([(0.4, 0.5), (0.5, 0.6), (0.6, 0.5)]):
        _write(out, _record(reproduce, "tip", "all", seed, base))
        _write(out, _record(reproduce, "tip", "soft_or_50", seed, soft_or))
        for variant, accuracy in (("unweighted", 0.9), ("paced", 0.8 + 0.05 * seed),
                                  ("paced_forward_then_reverse", 0.85)):
            _write(out, _record(reproduce, "paced", variant, seed, accuracy, max_steps=50, estimation_cpu_seconds=20.0,
                                pass_rate_histogram={"0": 0.5, "0_25": 0.25, "25_50": 0.25, "50_75": 0.0,
                                                     "75_100": 0.0, "1": 0.0, "unknown": 0.0}))
        for variant, shift in (("grpo", 0.0), ("ace", 0.01 * seed)):
            curve = {"pass_at_k": {str(k): 0.5 + shift for k in range(1, 17)}, "mean_completion_tokens": 25.0}
            # ACE's logged distributions over two steps: every statistic 1 + seed at step 1 and 3 + seed at step 2.
            history = {key: [[1, 1.0 + seed], [2, 3.0 + seed]] for key in reproduce.ACE_LOGGED} if variant == "ace" else {}
            _write(out, _record(reproduce, "ace", variant, seed, 0.4, pass_at_k=curve, history=history,
                                before_pass_at_k={"pass_at_k": {str(k): 0.1 for k in range(1, 17)},
                                                  "mean_completion_tokens": 25.0}))
        for variant, stages in (("student_grpo", ["student_rl"]), ("bridge", ["teacher_rl", "warmup", "opd"])):
            rows = [{"stage": "initial", "model": "teacher", "test": _test(1.0, 0.98)},
                    {"stage": "initial", "model": "student", "test": _test(0.4, 0.07)}]
            rows += [{"stage": stage, "model": "teacher" if stage == "teacher_rl" else "student",
                      "test": _test(0.5 + 0.1 * index + 0.01 * seed, 0.1 * (index + 1))}
                     for index, stage in enumerate(stages)]
            costs = {stage: {"train_seconds": 10.0, "train_cpu_seconds": 5.0 + seed, "peak_rss_mib": 600.0}
                     for stage in stages}
            final = rows[-1]["test"]
            _write(out, _record(reproduce, "bridge", variant, seed, final["greedy_accuracy"], stages=rows,
                                stage_costs=costs, sampled={"mean_accuracy": final["mean_accuracy"],
                                                            "pass_at_k": final["pass_at_k"]},
                                train_seconds=10.0 * len(stages), train_cpu_seconds=(5.0 + seed) * len(stages)))
        for variant in ("v2_m50", "v2_m1"):
            _write(out, _record(reproduce, "opsdc", variant, seed, 0.0,
                                before={"accuracy": 1.0, "mean_completion_tokens": 25.6},
                                teachers_view={"accuracy": 0.0, "mean_completion_tokens": 32.9},
                                curve=[[0, 1.0, 25.6], [10, 0.5 - 0.1 * seed, 27.0], [20, 0.0, 33.0]]))
    panel = {"entropy": [0.01, 0.02, 0.2, 0.3], "reverse_kl": [0.01, 0.5, 0.02, 2.0], "quadrant": [4, 3, 2, 1],
             "soft_or_kept": [0, 1, 0, 1], "quadrant_shares": [0.25, 0.25, 0.25, 0.25],
             "soft_or_kept_by_quadrant": [1.0, 0.0, 1.0, 0.0], "median_entropy": 0.1, "median_reverse_kl": 0.2,
             "tokens": 4}
    _write(out, _record(reproduce, "taxonomy", "soft_or_50", 0, 0.0, panels={"before": panel, "after": panel}))
    return out


def test_mean_and_sample_std(reproduce):
    assert reproduce.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert reproduce.mean_std([0.7]) == (0.7, 0.0)


def test_render_writes_tables_commands_and_figures(tmp_path, reproduce, results):
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\nHand-written text stays.\n\n<!-- reproduce:tip:start -->\nold\n"
                   "<!-- reproduce:tip:end -->\n\nAfter the section.\n")
    figures = reproduce.render(results, doc, tmp_path / "docs" / "results")
    text = doc.read_text()

    # TIP: accuracies 40/50/60 % → 50.0 ± 10.0; 50/60/50 % → 53.3 ± 5.8; paired differences +10, +10, −10: mean
    # 3.3, s = 11.547, 95 % interval 3.3 ∓ 4.303 · 11.547 / √3 = [−25.4, 32.0]; a claim of TIP's, within noise.
    assert ("| all tokens (plain OPD) | 50.0 ± 10.0 | 40.0 / 50.0 / 60.0 | 26.0 ± 1.0 | 10.0 ± 5.0 | 20 ± 10 "
            "| 501 ± 1 | 41 ± 1 |") in text
    assert "| soft-OR 50 % | 53.3 ± 5.8 | 50.0 / 60.0 / 50.0 |" in text
    assert "| soft-OR 50 % − all tokens (plain OPD) | 3.3 | [-25.4, 32.0] | 2 / 0 / 1 | **within noise** |" in text
    assert "\nold\n" not in text and "Hand-written text stays." in text and "After the section." in text
    # PACED: 80/85/90 % against 90 % each time; the runs used 50 steps, which the command must say.
    assert "| PACED p(1-p), reverse KL | 85.0 ± 5.0 |" in text
    # −10, −5, 0 points: s = 5, interval −5 ∓ 4.303 · 5 / √3 = [−17.4, 7.4]; no seed above, so it does not hold.
    assert ("| PACED p(1-p), reverse KL − unweighted, reverse KL | -5.0 | [-17.4, 7.4] | 0 / 1 / 2 "
            "| **does not hold** |") in text
    # Not a claim: no verdict.
    assert ("| PACED p(1-p), forward then reverse KL − unweighted, reverse KL | -5.0 | [-5.0, -5.0] | 0 / 0 / 3 "
            "|  |") in text
    # The schedule comparison at equal weighting: 85 % against 80/85/90 %.
    assert ("| PACED p(1-p), forward then reverse KL − PACED p(1-p), reverse KL | 0.0 | [-12.4, 12.4] | 1 / 1 / 1 "
            "| **within noise** |") in text
    assert "python benchmarks/reproduce.py paced --variants paced --seeds 0 1 2 --max-steps 50" in text
    assert "python benchmarks/reproduce.py tip --variants soft_or_50 --seeds 0 1 2\n" in text
    assert "p = 0: 50.0 %" in text and "50 optimiser steps" in text and "(20.0 ± 0.0 s of CPU time)" in text
    # OPSDC and the taxonomy.
    assert ("| v2 instruction, M = 1 | 100.0 ± 0.0 | 0.0 ± 0.0 | 0.0 ± 0.0 | 25.6 ± 0.0 | 32.9 ± 0.0 | 26.0 ± 1.0 "
            "| 10.0 ± 5.0 | 501 ± 1 |") in text
    assert "25.0 % (soft-OR 50 % keeps 100 %)" in text
    # ACE: pass@k of 50, 51, 52 % against 50 % at every k.
    assert "| ACE-GRPO (softplus, α = 1, c = sum) | 51.0 ± 1.0 | 51.0 ± 1.0 |" in text
    # Paired 0, 1, 2 points at every k: 1.0 ∓ 4.303 / √3.
    assert "| ACE-GRPO (softplus, α = 1, c = sum) − GRPO | " + " | ".join(["1.0 [-1.5, 3.5]"] * 5) + " |" in text
    # Its logged statistics averaged over the two steps: 2 + seed, i.e. 3.00 ± 1.00 over the seeds; GRPO has none.
    assert "| ACE-GRPO (softplus, α = 1, c = sum) | " + " | ".join(["3.00 ± 1.00"] * 8) + " |" in text
    assert "| student before | 10.0 ± 0.0 |" in text
    # The bridge: its final student at 70/71/72 % greedy, 30 % mean@16; direct GRPO at 50/51/52 %, 10 %.
    assert ("| student after OPD (the bridge's output) | 71.0 ± 1.0 | 30.0 ± 0.0 | 100.0 ± 0.0 | 25.0 ± 0.0 "
            "| 6.0 ± 1.0 |") in text
    assert "| student after direct GRPO | 51.0 ± 1.0 | 10.0 ± 0.0 | 100.0 ± 0.0 |" in text
    assert "| bridge: teacher GRPO, forward-KL warm-up, OPD | 18.0 ± 3.0 | 30 ± 0 |" in text
    assert "OPD − direct student GRPO (210 steps) | 20.0 [20.0, 20.0] | 20.0 [20.0, 20.0] | 0.0 [0.0, 0.0] |" in text
    assert "](results/tip.png)" in text
    assert "All results above: 34 runs" in text
    # The papers' claims, appended (the page had no markers for them), judged by the rule; those without records are
    # listed as awaiting runs.
    assert "## The papers' claims at this scale\n\n<!-- reproduce:claims:start -->" in text
    assert ("| TIP | soft-OR 50 % beats all-token OPD (MATH-500 79.1 vs 76.7 %) | 53.3 vs 50.0 %, paired 3.3 points "
            "[-25.4, 32.0], per seed 10.0 / 10.0 / -10.0 | **within noise** |") in text
    # Mean@16 30 % against 10 % on every seed.
    assert ("| bridge | the bridge beats direct (cold) student GRPO (MATH avg@16 78.5 vs 75.9 %) | 30.0 vs 10.0 %, "
            "paired 20.0 points [20.0, 20.0], per seed 20.0 / 20.0 / 20.0 | **holds** |") in text
    # OPSDC's model writes longer with the instruction (25.6 → 32.9 tokens): not testable, with the numbers.
    assert ("| OPSDC | −35 to −57 % tokens at equal or higher accuracy | the model writes no shorter with the "
            "instruction, so there is no concise mode to distil (mean completion tokens before training, without → "
            "with the instruction: 25.6 → 32.9 tokens, 7.3 tokens [7.3, 7.3], per seed 7.3 / 7.3 / 7.3) "
            "| **not testable** |") in text
    assert "| TIP | −47 % peak training memory at 50 % | the built-in models' vocabulary is too small" in text
    # Every quadrant at 25 %: Q4 and Q3 outside the paper's ranges in both panels.
    assert ("| TIP | token shares: Q4 40–47 %, Q1+Q2 40–52 %, Q3 3–15 % | Q4 25.0 / 25.0 %, Q1+Q2 50.0 / 50.0 %, "
            "Q3 25.0 / 25.0 % (the student's rollouts before / after training; seed 0) | **does not hold** |") in text
    assert ("Awaiting runs (no records yet, so not in the table; `python benchmarks/reproduce.py all --task "
            "arithmetic`):\n\n- TIP: entropy-sample 50 % beats all tokens (78.6 vs 76.7 %)\n- TIP: the choice of "
            "tokens matters") in text
    assert "<!-- reproduce:lab-claims:start -->" not in text  # no lab results, no lab claims section

    assert sorted(path.name for path in figures) == ["ace.png", "bridge.png", "opsdc.png", "paced.png", "taxonomy.png",
                                                     "tip.png"]
    for path in figures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000

    # Rendering again from the same results changes nothing.
    reproduce.render(results, doc, tmp_path / "docs" / "results")
    assert doc.read_text() == text


def test_a_stored_result_is_reused_only_with_the_same_settings(tmp_path, reproduce, results):
    assert reproduce.pending_runs("tip", ["all", "soft_or_50"], [0, 1, 2], results, "test", False) == []
    # A result without a measurement this version of the script takes is stale.
    path = results / "tip" / "all" / "seed1.json"
    record = json.loads(path.read_text())
    del record["train_cpu_seconds"]
    path.write_text(json.dumps(record))
    assert reproduce.pending_runs("tip", ["all"], [0, 1], results, "test", False) == [("tip", "all", 1)]
    assert reproduce.pending_runs("tip", ["all"], [0, 3], results, "test", False) == [("tip", "all", 3)]
    # Other step counts or another split are other runs; --force reruns.
    assert len(reproduce.pending_runs("tip", ["all"], [0, 1], results, "test", False, {"max_steps": 7})) == 2
    assert len(reproduce.pending_runs("tip", ["all"], [0, 1], results, "test", False, {"learning_rate": 1e-3})) == 2
    assert reproduce.pending_runs("tip", ["all"], [0], results, "test", False, {"max_steps": None}) == []
    assert len(reproduce.pending_runs("tip", ["all"], [0], results, "validation", False)) == 1
    assert len(reproduce.pending_runs("tip", ["all"], [0], results, "test", True)) == 1


def test_every_row_command_parses(reproduce, results):
    for path in results.glob("*/*/seed*.json"):
        command = json.loads(path.read_text())["command"].split()
        assert command[:2] == ["python", "benchmarks/reproduce.py"]
        reproduce.make_parser().parse_args(command[2:])


def test_lab_runs_are_their_own_runs_and_render_by_level(tmp_path, reproduce):
    # The lab's settings carry the task, its results live under lab/, its commands say --task lab, and its sections
    # (with their per-level tables) are rendered between their own markers, next to the addition task's.
    out = tmp_path / "runs"
    with reproduce.active_task("lab"):
        assert reproduce.run_settings("tip", "all", 0, "test")["task"] == "lab"
        assert (reproduce.row_command("tip", "all", [0])
                == "python benchmarks/reproduce.py tip --variants all --seeds 0 --task lab")
        for seed, (base, soft_or) in enumerate([(0.4, 0.5), (0.5, 0.6), (0.6, 0.5)]):
            for variant, accuracy in (("all", base), ("soft_or_50", soft_or)):
                record = _record(reproduce, "tip", variant, seed, accuracy)
                # Level 0 at accuracy + 0.3, level 2 at accuracy − 0.3, tokens 100 / 110 / 120.
                record["eval"]["levels"] = {str(level): {"accuracy": accuracy + 0.3 * (1 - level),
                                                         "mean_completion_tokens": 100.0 + 10 * level,
                                                         "num_problems": 60} for level in (0, 1, 2)}
                _write(reproduce.task_out(out, "lab"), record)
    assert "task" not in reproduce.run_settings("tip", "all", 0, "test")
    assert reproduce.pending_runs("tip", ["all"], [0], reproduce.task_out(out, "lab"), "test", False) != []
    with reproduce.active_task("lab"):
        assert reproduce.pending_runs("tip", ["all"], [0, 1, 2], reproduce.task_out(out, "lab"), "test", False) == []
    assert not list(out.glob("*/*/seed*.json"))  # the addition task's results are not the lab's
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n")
    figures = reproduce.render(out, doc, tmp_path / "docs" / "results")
    text = doc.read_text()
    assert "<!-- reproduce:lab-tip:start -->" in text and "<!-- reproduce:tip:start -->" not in text
    # Level 0 of soft-OR: 80 / 90 / 80 % → 83.3 ± 5.8; all tokens: 70 / 80 / 90 % at level 0, 10 / 20 / 30 % at
    # level 2.
    assert "| soft-OR 50 % | 83.3 ± 5.8 | 100.0 ± 0.0 |" in text
    assert ("| all tokens (plain OPD) | 80.0 ± 10.0 | 100.0 ± 0.0 | 50.0 ± 10.0 | 110.0 ± 0.0 | 20.0 ± 10.0 "
            "| 120.0 ± 0.0 |") in text
    assert "python benchmarks/reproduce.py tip --variants all --seeds 0 1 2 --task lab" in text
    assert "All results of the lab above: 6 runs" in text
    assert sorted(path.relative_to(tmp_path / "docs" / "results").as_posix() for path in figures) == [
        "lab/tip.png", "lab/tip_levels.png"]
    assert "](results/lab/tip_levels.png)" in text


def test_an_empty_cache_starts_from_the_shipped_lab_and_a_prepared_one_is_kept(tmp_path, reproduce):
    from trl_tip.tasks import LabTask, prepare_lab_models

    key = LabTask().cache_key
    copied = reproduce.seed_lab_cache(tmp_path)
    assert copied == tmp_path / key
    shipped = reproduce.SHIPPED_LAB / key
    assert (copied / "teacher" / "model.safetensors").read_bytes() == (
        shipped / "teacher" / "model.safetensors").read_bytes()
    # The copy is a complete cache entry: preparing loads it (training would take minutes and rewrite metrics.json).
    before = (copied / "metrics.json").read_text()
    prepared = prepare_lab_models(cache_dir=tmp_path, verbose=False)
    assert prepared["metrics"]["precondition_failures"] == [] and (copied / "metrics.json").read_text() == before
    assert not list(tmp_path.glob("*.partial"))
    # A lab already in the cache (for instance prepared on this machine) is never overwritten.
    (copied / "metrics.json").write_text('{"precondition_failures": []}')
    assert reproduce.seed_lab_cache(tmp_path) is None
    assert (copied / "metrics.json").read_text() == '{"precondition_failures": []}'
    # Nothing to copy from: nothing happens.
    assert reproduce.seed_lab_cache(tmp_path / "other", shipped=tmp_path / "nowhere") is None
    assert not (tmp_path / "other").exists()


# --- the verdict rule, the claims, and the page against its records --------------------------------------------------


@pytest.fixture(scope="module")
def package(reproduce):
    """The `reproduction` package behind the script (loaded with it)."""
    return sys.modules["reproduction"]


def test_the_t_table_gives_the_975_quantile(package):
    # P(T ≤ t) for Student's t with df degrees of freedom, by Simpson's rule on its density: 0.975 at every tabulated
    # quantile (the table's three decimals move the probability by less than 1e-4).
    def cdf(t, df, steps=4000):
        scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        density = [scale * (1 + (t * i / steps) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
        weights = [1 if i in (0, steps) else 4 if i % 2 else 2 for i in range(steps + 1)]
        return 0.5 + t / steps / 3 * sum(w * f for w, f in zip(weights, density))

    for df, t in package.results.T_975.items():
        assert cdf(t, df) == pytest.approx(0.975, abs=1e-4), df
    # Between rows the smaller df's quantile (the wider interval); past the last row, the last row's.
    assert package.results.t_975(2) == 4.303
    assert package.results.t_975(35) == package.results.T_975[30]
    assert package.results.t_975(1000) == package.results.T_975[120]


def test_the_verdict_rule_on_hand_computed_cases(package):
    verdict, mean_interval = package.results.verdict, package.results.mean_interval
    # 1, 2, 3: mean 2, s = 1, half-width t(0.975, 2) · s / √3 = 4.303 / 1.7321 = 2.4843.
    mean, lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and lo == pytest.approx(-0.4843, abs=1e-4) and hi == pytest.approx(4.4843, abs=1e-4)
    assert mean_interval([0.7]) == (0.7, None, None)
    # 2, 3, 4: [0.516, 5.484], every seed above 0.
    assert verdict([2.0, 3.0, 4.0]) == "holds"
    assert verdict([2.0, 3.0, 4.0], "no worse") == "holds"
    # Every seed above 0, but 1, 2, 9 (mean 4, s = 4.359) give 4 ∓ 10.83: the interval reaches below 0.
    assert verdict([1.0, 2.0, 9.0]) == "within noise"
    # Ten seeds, one below 0: mean 0.89, s = 0.3479, 0.89 ∓ 2.262 · 0.3479 / √10 = [0.641, 1.139] is above 0, but
    # not every seed agrees.
    assert verdict([-0.1] + [1.0] * 9) == "within noise"
    # The interval below 0 ([-1.139, -0.641]) does not hold, even with a seed above 0.
    assert verdict([0.1] + [-1.0] * 9) == "does not hold"
    assert verdict([-2.0, -3.0, -4.0]) == "does not hold"
    # Every seed fails the direction although the interval (−4 ∓ 10.83) reaches above 0.
    assert verdict([-1.0, -2.0, -9.0]) == "does not hold"
    # A tie fails "higher" but not "no worse".
    assert verdict([0.0, 0.0, 0.0]) == "does not hold"
    assert verdict([0.0, 0.0, 0.0], "no worse") == "within noise"
    assert verdict([0.0, -1.0, 0.0], "no worse") == "within noise"
    assert verdict([-1.0, -1.0, -2.0], "no worse") == "does not hold"
    # One seed has no interval: it never holds.
    assert verdict([5.0]) == "within noise"
    assert verdict([-5.0]) == "does not hold"
    assert verdict([0.0], "no worse") == "within noise"
    assert verdict([]) is None
    with pytest.raises(ValueError, match="direction"):
        verdict([1.0], "better")


def _bare(seed, **fields):
    return {"settings": {"seed": seed}, **fields}


def test_claims_measured_from_hand_made_lab_records(reproduce, package):
    claims = package.claims
    with reproduce.active_task("lab"):
        # OPSDC v2, M = 50: 100 tokens and 90 % before training, 30 tokens with the instruction (a concise mode);
        # after training 25 / 26 / 27 tokens (−75, −74, −73: −74 ∓ 2.48) at 90 / 91 / 89 % (0, +1, −1 points).
        def opsdc(accuracies, instructed=30.0):
            return {"opsdc": {"v2_m50": [
                _bare(seed, before={"accuracy": 0.9, "mean_completion_tokens": 100.0},
                      teachers_view={"accuracy": 0.9, "mean_completion_tokens": instructed},
                      eval={"accuracy": accuracy, "mean_completion_tokens": 25.0 + seed})
                for seed, accuracy in enumerate(accuracies)]}}

        measured = claims.OPSDC_COMPRESSION.judge(opsdc([0.9, 0.91, 0.89]))
        # Fewer tokens holds and the accuracy part is within noise (not refuted): the claim holds.
        assert measured == claims.Measured(
            "mean completion tokens: 100.0 → 26.0 tokens, -74.0 tokens [-76.5, -71.5] (-74 %), per seed -75.0 / "
            "-74.0 / -73.0; greedy accuracy: 90.0 → 90.0 %, 0.0 points [-2.5, 2.5], per seed 0.0 / 1.0 / -1.0",
            "holds")
        # The accuracy falls on every seed: the claim does not hold.
        assert claims.OPSDC_COMPRESSION.judge(opsdc([0.5, 0.6, 0.5])).verdict == "does not hold"
        # The model writes longer with the instruction: not testable, whatever training did.
        measured = claims.OPSDC_COMPRESSION.judge(opsdc([0.9, 0.91, 0.89], instructed=120.0))
        assert measured.verdict == "not testable"
        assert measured.text.startswith("the model writes no shorter with the instruction")
        assert "100.0 → 120.0" in measured.text
        # Without the records, the claim awaits its runs.
        assert claims.OPSDC_COMPRESSION.judge({}) is None

        # GRPO at three times the steps: pass@1 37 % → 50 / 51 / 52 %, pass@16 (the largest k) 95 % → 90 / 91 / 92 %.
        grpo_long = {"ace": {"grpo_long": [
            _bare(seed, pass_at_k={"pass_at_k": {"1": 0.50 + 0.01 * seed, "16": 0.90 + 0.01 * seed}},
                  before_pass_at_k={"pass_at_k": {"1": 0.37, "16": 0.95}}) for seed in range(3)]}}
        measured = claims.ACE_PATHOLOGY.judge(grpo_long)
        assert measured.verdict == "holds"
        assert measured.text.startswith("pass@1: 37.0 → 51.0 %, 14.0 points [11.5, 16.5]")
        assert "; pass@16: 95.0 → 91.0 %, -4.0 points [-6.5, -1.5]" in measured.text
        # pass@16 rises instead (95 → 96 / 97 / 98 %): the pathology is not there.
        for seed, record in enumerate(grpo_long["ace"]["grpo_long"]):
            record["pass_at_k"]["pass_at_k"]["16"] = 0.96 + 0.01 * seed
        assert claims.ACE_PATHOLOGY.judge(grpo_long).verdict == "does not hold"

        # Token shares of the two panels: Q4 44.3 / 42.3 %, Q1+Q2 50 %, Q3 5.7 / 7.7 %, all in the paper's ranges.
        def taxonomy(q3_after):
            q1_after = 0.5 - q3_after
            return {"taxonomy": {"soft_or_50": [_bare(0, panels={
                "before": {"quadrant_shares": [0.443, 0.057, 0.057, 0.443]},
                "after": {"quadrant_shares": [q1_after, q3_after, q3_after, q1_after]}})]}}

        assert claims.TIP_SHARES.judge(taxonomy(0.077)) == claims.Measured(
            "Q4 44.3 / 42.3 %, Q1+Q2 50.0 / 50.0 %, Q3 5.7 / 7.7 % (the student's rollouts before / after training; "
            "seed 0)", "holds")
        # Q3 at 2 % after training (and Q4 at 48 %): one panel in range, one out: within noise.
        assert claims.TIP_SHARES.judge(taxonomy(0.02)).verdict == "within noise"

        # A "no worse" paired claim: sampling 1, 2, 3 points below weighting on every seed does not hold; ties do not
        # refute it.
        def paced(deltas):
            return {"paced": {
                "paced": [_bare(seed, eval={"accuracy": 0.8}) for seed in range(3)],
                "paced_sample": [_bare(seed, eval={"accuracy": 0.8 + d / 100}) for seed, d in enumerate(deltas)]}}

        assert claims.PACED_SAMPLING.judge(paced([-1, -2, -3])).verdict == "does not hold"
        assert claims.PACED_SAMPLING.judge(paced([0, 0, 0])).verdict == "within noise"
        assert claims.PACED_SAMPLING.judge(paced([2, 3, 4])).verdict == "holds"

        # Per level: v2's tokens at the hardest level against v1's, seed by seed.
        def levels(tokens):
            return {"eval": {"levels": {"0": {"mean_completion_tokens": 20.0},
                                        "2": {"mean_completion_tokens": tokens}}}}

        opsdc_levels = opsdc([0.9, 0.9, 0.9])
        for seed, record in enumerate(opsdc_levels["opsdc"]["v2_m50"]):
            record["eval"].update(levels(40.0 + seed)["eval"])
        opsdc_levels["opsdc"]["v1_m50"] = [_bare(seed, **levels(28.0)) for seed in range(3)]
        measured = claims.OPSDC_DIFFICULTY.judge(opsdc_levels)
        assert measured.verdict == "holds"
        assert measured.text.startswith("41.0 vs 28.0 tokens, paired 13.0 tokens [10.5, 15.5]")

        # A claim the lab cannot test is in the table without records; the others wait for theirs.
        rows, awaiting = claims.claim_rows("lab", grpo_long)
        assert [claim for claim, _ in rows] == [claims.TIP_MEMORY, claims.PACED_SELF, claims.ACE_PATHOLOGY]
        assert claims.BRIDGE in awaiting and len(rows) + len(awaiting) == len(claims.CLAIMS["lab"])


def test_every_claim_names_what_its_task_runs(reproduce, package):
    claims = package.claims
    for task, listed in claims.CLAIMS.items():
        assert len({claim.text for claim in listed}) == len(listed)
        with reproduce.active_task(task):
            for claim in listed:
                assert (claim.measure is None) == (claim.untestable is not None), claim.text
                if claim.untestable is not None:
                    # A reason, not a measurement: no number in it.
                    assert not re.search(r"\d", claim.untestable), claim.untestable
                    continue
                measure = claim.measure
                if isinstance(measure, claims.Shares):
                    assert measure.variant in package.spec_of(measure.method)["variants"], (task, claim.text)
                    continue
                compared = measure.comparisons() if isinstance(measure, claims.AllOf) else [measure]
                for part in [*compared, *([claim.precondition] if claim.precondition else [])]:
                    variants = package.spec_of(part.method)["variants"]
                    assert part.variant in variants, (task, claim.text)
                    assert (part.reference or part.variant) in variants, (task, claim.text)


def _page_difference(reproduce, out: Path, doc: Path, figures: Path) -> str | None:
    """None when `doc` is byte for byte what the records under `out` give; otherwise where it first differs."""
    import difflib

    rendered = reproduce.render_page(out, doc, figures)
    committed = doc.read_text()
    if rendered == committed:
        return None
    diff = difflib.unified_diff(committed.splitlines(), rendered.splitlines(), f"{doc} (committed)",
                                f"{doc} (rendered from {out})", lineterm="", n=1)
    return "\n".join(list(diff)[:40])


def test_a_page_is_compared_byte_for_byte_with_what_its_records_give(tmp_path, reproduce):
    out = tmp_path / "records"
    for seed, (base, soft_or) in enumerate([(0.4, 0.5), (0.5, 0.6), (0.6, 0.5)]):
        _write(out, _record(reproduce, "tip", "all", seed, base))
        _write(out, _record(reproduce, "tip", "soft_or_50", seed, soft_or))
    doc, figures = tmp_path / "docs" / "results.md", tmp_path / "docs" / "results"
    doc.parent.mkdir()
    doc.write_text("# Results\n\n<!-- reproduce:claims:start -->\n<!-- reproduce:claims:end -->\n")
    reproduce.render(out, doc, figures)
    page = doc.read_text()
    assert "| TIP | soft-OR 50 % beats all-token OPD" in page
    assert _page_difference(reproduce, out, doc, figures) is None
    reproduce.main(["render", "--check", "--out", str(out), "--doc", str(doc), "--figures", str(figures)])
    # One value of one record changes (40.0 → 40.1 %): the page is no longer what the records give.
    path = out / "tip" / "all" / "seed0.json"
    record = json.loads(path.read_text())
    record["eval"]["accuracy"] = 0.401
    path.write_text(json.dumps(record))
    difference = _page_difference(reproduce, out, doc, figures)
    assert difference is not None and "+| all tokens (plain OPD) | 50.0 ± 10.0 | 40.1 / 50.0 / 60.0" in difference
    with pytest.raises(SystemExit, match="is not what the records under"):
        reproduce.main(["render", "--check", "--out", str(out), "--doc", str(doc), "--figures", str(figures)])
    assert doc.read_text() == page  # comparing writes nothing


@pytest.mark.results
def test_the_committed_page_is_what_the_committed_records_give(reproduce):
    out = reproduce.DEFAULT_OUT
    missing = [task for task in ("arithmetic", "lab")
               if not list(reproduce.task_out(out, task).glob("*/*/seed*.json"))]
    if missing:
        pytest.fail(f"{out.relative_to(ROOT)} holds no records of the {' and '.join(missing)} task: run "
                    "`python benchmarks/reproduce.py all` and commit its records with docs/results.md.")
    difference = _page_difference(reproduce, out, ROOT / "docs" / "results.md", ROOT / "docs" / "results")
    assert difference is None, ("docs/results.md is not what the committed records give (`python "
                                f"benchmarks/reproduce.py render` writes it):\n{difference}")


def test_what_a_run_keeps_besides_its_record_is_not_committed(reproduce, package):
    # The records are committed; the run's log and the student the taxonomy reads (model weights) are not.
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path):
        return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", str(path)]).returncode == 0

    out = reproduce.DEFAULT_OUT.relative_to(ROOT)
    assert out == Path("benchmarks/results/reproduce")
    for task in package.TASKS:
        base = reproduce.task_out(out, task)
        record = package.run_path(base, "tip", "soft_or_50", 0)
        assert not ignored(record)
        assert ignored(record.with_suffix(".log"))
        assert ignored(package.run_dir(base, "tip", "soft_or_50", 0) / "model" / "model.safetensors")
