"""
The `math_pass_at_k` metric shipped for Hugging Face `evaluate`: it loads from the package offline, grades with
`trl_tip.evaluation` and reports the numbers `trl-tip eval` reports for the same completions.
"""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import evaluate
import pytest

import trl_tip.cli as cli
import trl_tip.evaluation as evaluation
from trl_tip.evaluation import load_metric
from trl_tip.metrics import METRIC_PATHS, METRICS_DIR


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def metric():
    return load_metric()


def test_loads_from_the_package_directory_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: any Hub access would fail
    path = Path(METRIC_PATHS["math_pass_at_k"])
    assert path.parent == METRICS_DIR and (path / "math_pass_at_k.py").is_file()
    # `evaluate.load` on the directory itself, as a user without the helper would call it.
    result = evaluate.load(str(path)).compute(predictions=[["\\boxed{7}"]], references=["7"])
    assert result == {"pass@1": 1.0, "mean@n": 1.0, "num_ungradable": 0, "num_problems": 1, "num_samples": 1}


def test_loads_offline_in_a_fresh_process_with_an_empty_cache(tmp_path):
    # What a user gets the first time: no module cache, the Hub switched off, only `evaluate` and the installed package.
    code = (
        "import evaluate, trl_tip.metrics as m; "
        "print(evaluate.load(m.METRIC_PATHS['math_pass_at_k']).compute(predictions=[['Answer: 3', 'x']], "
        "references=['3'])['pass@2'])"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == "1.0"
    assert (tmp_path / "modules").is_dir()  # evaluate imported the script from its own copy there


def test_package_data_ships_the_metric_files():
    # The metric directory has no __init__.py (`evaluate.load` reads the script from disk), so the wheel carries it
    # only through package-data.
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {path for pattern in patterns["trl_tip.metrics"] for path in METRICS_DIR.glob(pattern)}
    assert {METRICS_DIR / "math_pass_at_k" / name for name in ("math_pass_at_k.py", "README.md")} <= shipped


def test_hand_computed_pass_at_k_and_mean_at_n(metric):
    # n = 4. Problem A: 1 correct; B: 2 correct; C: 0 correct and an unparseable gold answer.
    predictions = [
        ["\\boxed{4}", "\\boxed{5}", "no answer", "\\boxed{3}"],
        ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{2}", "\\boxed{1}"],
        ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{4}"],
    ]
    result = metric.compute(predictions=predictions, references=["4", "1/2", ""], k=[1, 2, 4])
    # pass@2 = 1 - C(n-c, 2)/C(4, 2): A 1 - 3/6 = 1/2, B 1 - 1/6 = 5/6, C 0.
    assert result["pass@1"] == pytest.approx((1 / 4 + 2 / 4 + 0) / 3, rel=1e-12)
    assert result["pass@2"] == pytest.approx((1 / 2 + 5 / 6 + 0) / 3, rel=1e-12)
    assert result["pass@4"] == pytest.approx(2 / 3, rel=1e-12)
    assert result["mean@n"] == pytest.approx(3 / 12, rel=1e-12)
    assert (result["num_ungradable"], result["num_problems"], result["num_samples"]) == (1, 3, 4)
    assert set(result) == {"pass@1", "pass@2", "pass@4", "mean@n", "num_ungradable", "num_problems", "num_samples"}
    # Default: every k = 1..n; a single int works too.
    assert [key for key in metric.compute(predictions=predictions, references=["4", "1/2", "x"]) if
            key.startswith("pass@")] == ["pass@1", "pass@2", "pass@3", "pass@4"]
    assert set(metric.compute(predictions=predictions, references=["4", "1/2", "x"], k=3)) >= {"pass@3"}


def test_grades_with_the_package_grader(metric, monkeypatch):
    # One implementation: replacing trl_tip's grader changes what the metric reports.
    monkeypatch.setattr(evaluation, "grade_answer", lambda completion, gold: float(completion == "right"))
    result = metric.compute(predictions=[["right", "\\boxed{4}"]], references=["4"])
    assert result["mean@n"] == 0.5 and result["pass@2"] == 1.0


def test_rejects_bad_input_with_clear_errors(metric):
    with pytest.raises(ValueError, match="same number of completions for every problem"):
        metric.compute(predictions=[["a", "b"], ["c"]], references=["1", "2"])
    with pytest.raises(ValueError, match=r"k must be integers in 1\.\.2"):
        metric.compute(predictions=[["a", "b"]], references=["1"], k=[1, 3])
    with pytest.raises(ValueError, match=r"k must be integers in 1\.\.2"):
        metric.compute(predictions=[["a", "b"]], references=["1"], k=0)
    with pytest.raises(ValueError, match="at least one completion"):
        metric.compute(predictions=[[]], references=["1"])
    with pytest.raises(ValueError, match="expected format"):  # evaluate's own check: gold answers are text
        metric.compute(predictions=[["a"]], references=[4])


def test_equals_trl_tip_eval_on_the_same_completions(metric, arithmetic_models, tmp_path):
    output = tmp_path / "run"
    cli.main(["eval", "--model", arithmetic_models["student"], "--dataset", "builtin", "--num_problems", "12",
              "--n", "4", "--temperature", "1.0", "--top_p", "1.0", "--output_dir", str(output)])
    records = [json.loads(line) for line in (output / "builtin.jsonl").read_text().splitlines()]
    expected = json.loads((output / "summary.json").read_text())["results"]["builtin"]
    assert 0.0 < expected["mean_accuracy"] < expected["pass_at_k"]["4"]  # neither all right nor all wrong

    result = metric.compute(predictions=[r["completions"] for r in records], references=[r["answer"] for r in records])
    # Same grader, same estimator, same summation order: equal, not close.
    assert result["mean@n"] == expected["mean_accuracy"]
    assert {k: result[f"pass@{k}"] for k in range(1, 5)} == {int(k): v for k, v in expected["pass_at_k"].items()}
    assert (result["num_ungradable"], result["num_problems"], result["num_samples"]) == (
        expected["num_ungradable"], expected["num_problems"], expected["num_samples"])
