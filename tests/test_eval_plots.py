"""
`trl-tip eval` pictures: the pass@k-against-k plot and the per-level bars next to `summary.json`, and `--compare`
overlaying finished runs. The plotted values are checked against the summaries they come from.
"""

import json

import matplotlib.image
import pytest
from datasets import Dataset

import trl_tip.cli as cli
import trl_tip.eval_plots as eval_plots
import trl_tip.evaluation as evaluation
from trl_tip.eval_plots import levels_figure, pass_at_k_figure, read_report, short_name
from trl_tip.evaluation import grade_problems, summarize, summarize_by


LEVELED = "my-org/leveled-sums"  # a Hub id served by the fixture below, with a MATH-style `level` column


def test_summarize_by_groups_in_natural_order():
    # Gold answer 4 everywhere; level "10" holds one correct sample of 2, "2" two of 2, "Level 3" none.
    records = grade_problems(["4"] * 3, ["\\boxed{4}", "\\boxed{5}", "\\boxed{4}", "\\boxed{4}", "x", "y"], None, 2)
    for record, level in zip(records, [10, 2, "Level 3"], strict=True):
        record["level"] = level
    by_level = summarize_by(records, "level", 2)
    assert list(by_level) == ["2", "10", "Level 3"]
    assert [by_level[key]["mean_accuracy"] for key in by_level] == [1.0, 0.5, 0.0]
    assert [by_level[key]["pass_at_k"][2] for key in by_level] == [1.0, 1.0, 0.0]
    assert by_level["10"] == summarize(records[:1], 2)
    with pytest.raises(ValueError, match="have no `level`"):
        summarize_by(records + grade_problems(["1"], ["a", "b"], None, 2), "level", 2)


def test_short_names_for_legends():
    assert short_name("Qwen/Qwen3-1.7B") == "Qwen/Qwen3-1.7B"
    assert short_name("/root/.cache/runs/ace/") == "ace"
    assert short_name("outputs/bridge/opd") == "opd"
    assert short_name("./ckpt") == "ckpt"


def _leveled_rows():
    """The built-in test problems as a Hub dataset with `level` 1-3."""
    test = evaluation.load_benchmark("builtin", num_problems=12)
    return Dataset.from_dict(
        {"problem": test["problem"], "answer": test["answer"], "level": [1 + i % 3 for i in range(12)]}
    )


def _eval(model, output, seed="0"):
    return cli.main(["eval", "--model", model, "--dataset", "builtin", LEVELED, "--prompt_template", "{problem}",
                     "--num_problems", "12", "--n", "4", "--temperature", "1.0", "--top_p", "1.0",
                     "--max_new_tokens", "32", "--seed", seed, "--output_dir", str(output)])


def _is_drawn_png(path):
    pixels = matplotlib.image.imread(path)
    return pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels.std() > 0.01


@pytest.fixture(scope="module")
def two_runs(arithmetic_models, tmp_path_factory):
    """Two finished `trl-tip eval` runs (seeds 0 and 1) on the built-in problems and their leveled Hub twin."""
    base = tmp_path_factory.mktemp("eval-runs")
    rows = _leveled_rows()
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation, "load_dataset", lambda *args, **kwargs: rows)
        for name, seed in (("seed0", "0"), ("seed1", "1")):
            assert _eval(arithmetic_models["student"], base / name, seed) == 0
            runs[name] = base / name
    return runs


def test_eval_writes_plots_and_per_level_results(two_runs, capsys):
    output = two_runs["seed0"]
    report = read_report(output)
    leveled = report["results"][LEVELED]
    assert "by_level" not in report["results"]["builtin"]  # no level column, no level bars
    # Per level, the summary of that level's problems as the JSONL records them.
    records = [json.loads(line) for line in (output / f"{LEVELED.replace('/', '__')}.jsonl").read_text().splitlines()]
    assert [r["level"] for r in records] == [1 + i % 3 for i in range(12)]
    assert list(leveled["by_level"]) == ["1", "2", "3"]
    for level, summary in leveled["by_level"].items():
        mine = [r for r in records if str(r["level"]) == level]
        assert summary["num_problems"] == 4
        assert summary["mean_accuracy"] == pytest.approx(sum(s for r in mine for s in r["scores"]) / 16, abs=1e-12)
        assert summary["pass_at_k"]["4"] == pytest.approx(sum(r["num_correct"] > 0 for r in mine) / 4, abs=1e-12)
    for name in ("pass_at_k.png", f"{LEVELED.replace('/', '__')}_levels.png"):
        assert _is_drawn_png(output / name), name
    assert not (output / "builtin_levels.png").exists()


def test_eval_prints_one_line_per_level():
    records = grade_problems(["4"] * 3, ["\\boxed{4}", "\\boxed{5}", "\\boxed{4}", "\\boxed{4}", "x", "y"], None, 2)
    for record, level in zip(records, [1, 1, 2], strict=True):
        record["level"] = level
    summary = {**summarize(records, 2), "by_level": summarize_by(records, "level", 2)}
    assert cli._format_levels(summary) == [
        "  level 1: 2 problems  mean@2 75.0  pass@2 100.0",
        "  level 2: 1 problems  mean@2 0.0  pass@2 0.0",
    ]
    assert cli._format_levels(summarize(records, 2)) == []


def test_pass_at_k_figure_plots_the_summary_in_percent(two_runs):
    runs = {name: read_report(path) for name, path in two_runs.items()}
    figure = pass_at_k_figure(runs)
    axes = figure.axes
    assert [ax.get_title().split(" (")[0] for ax in axes] == ["builtin", LEVELED]
    for ax, dataset in zip(axes, ["builtin", LEVELED], strict=True):
        lines = ax.get_lines()
        assert len(lines) == 2  # one per run
        for line, report in zip(lines, runs.values(), strict=True):
            summary = report["results"][dataset]
            assert list(line.get_xdata()) == [1, 2, 3, 4]
            expected = [100 * summary["pass_at_k"][str(k)] for k in range(1, 5)]
            assert list(line.get_ydata()) == pytest.approx(expected, abs=1e-9)
    assert [text.get_text().split("  ")[0] for text in axes[0].get_legend().get_texts()] == ["seed0", "seed1"]


def test_a_run_keeps_its_colour_where_another_run_lacks_the_dataset():
    one = {"results": {"x": summarize(grade_problems(["4"], ["\\boxed{4}"], None, 1), 1)}}
    two = {"results": {name: summarize(grade_problems(["4"], ["\\boxed{4}", "y"], None, 2), 2) for name in "xy"}}
    x_axes, y_axes = pass_at_k_figure({"one": one, "two": two}).axes
    assert [line.get_label().split("  ")[0] for line in y_axes.get_lines()] == ["two"]
    assert y_axes.get_lines()[0].get_color() == x_axes.get_lines()[1].get_color() != x_axes.get_lines()[0].get_color()
    assert x_axes.get_lines()[0].get_label() == "one  (pass@1 100.0)"  # n = 1: pass@1 once


def test_levels_figure_bars_are_mean_and_pass_at_n_per_level(two_runs):
    runs = {name: read_report(path) for name, path in two_runs.items()}
    mean_axes, pass_axes = levels_figure(runs, LEVELED).axes
    assert (mean_axes.get_title(), pass_axes.get_title()) == ("mean@4", "pass@4")
    for ax, pick in ((mean_axes, lambda s: s["mean_accuracy"]), (pass_axes, lambda s: s["pass_at_k"]["4"])):
        containers = ax.containers
        assert len(containers) == 2
        for bars, report in zip(containers, runs.values(), strict=True):
            by_level = report["results"][LEVELED]["by_level"]
            heights = [bar.get_height() for bar in bars]
            assert heights == pytest.approx([100 * pick(by_level[level]) for level in ("1", "2", "3")], abs=1e-9)
    with pytest.raises(ValueError, match="no `level` column"):
        levels_figure(runs, "builtin")


def test_compare_overlays_finished_runs(two_runs, tmp_path, capsys):
    output = tmp_path / "comparison"
    assert cli.main(["eval", "--compare", str(two_runs["seed0"]), str(two_runs["seed1"] / "summary.json"),
                     "--labels", "GRPO", "ACE-GRPO", "--output_dir", str(output)]) == 0
    printed = capsys.readouterr().out
    written = sorted(path.name for path in output.iterdir())
    assert written == ["compare_my-org__leveled-sums_levels.png", "compare_pass_at_k.png"]
    assert all(_is_drawn_png(output / name) for name in written)
    assert "compare_pass_at_k.png" in printed
    # Without --labels the run directories name the lines.
    cli.main(["eval", "--compare", str(two_runs["seed0"]), str(two_runs["seed1"]), "--output_dir", str(output)])
    assert (output / "compare_pass_at_k.png").is_file()


def test_compare_rejects_bad_input(two_runs, tmp_path, capsys):
    run = str(two_runs["seed0"])
    cases = [
        (["--compare", run], "two or more runs"),
        (["--compare", run, run, "--model", "m"], "drop --model"),
        (["--compare", run, run, "--n", "4", "--greedy"], "drop --n --greedy"),
        (["--compare", run, str(tmp_path / "missing")], "No summary.json"),
        (["--compare", run, run, "--labels", "a"], "one label per --compare run"),
        (["--compare", run, run, "--labels", "a", "a"], "distinct labels"),
        (["--compare", run, run], "distinct labels"),  # the same directory twice
        ([], "--model"),
        (["--model", "m", "--labels", "a"], "needs --compare"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            cli.main(["eval", *argv])
        assert message in capsys.readouterr().err, argv
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{}")
    with pytest.raises(SystemExit):
        cli.main(["eval", "--compare", run, str(tmp_path / "bad")])
    assert "not a `trl-tip eval` summary" in capsys.readouterr().err


def test_without_matplotlib_eval_keeps_its_results_and_says_how_to_plot(two_runs, tmp_path, monkeypatch, capsys):
    def no_matplotlib(*args, **kwargs):
        raise ImportError("Plotting `trl-tip eval` results needs matplotlib: `pip install 'trl-tip[plots]'`")

    monkeypatch.setattr(eval_plots, "_figure", no_matplotlib)
    cli._write_plots(read_report(two_runs["seed0"]), str(tmp_path))
    printed = capsys.readouterr().out
    assert "No plot written" in printed and "trl-tip[plots]" in printed
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        cli.main(["eval", "--compare", str(two_runs["seed0"]), str(two_runs["seed1"]), "--output_dir", str(tmp_path)])
    assert "trl-tip[plots]" in capsys.readouterr().err
