"""
The lab's preconditions, re-measured on its cached teacher and student.

Training the pair takes about five minutes on two cores, too long for the suite, so a copy of the cache directory that
`prepare_lab_models()` writes (task seed 0) is kept under `tests/data/lab/`. When the lab's recipe changes, its
version (`LAB_VERSION`) and so its cache key change, every test below fails, and the copy is refreshed with

    python -m trl_tip.tasks --task lab
    cp -r ~/.cache/trl_tip/<cache key> tests/data/lab/
"""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from trl_tip.tasks import LabTask, check_preconditions, measure_preconditions, prepare_lab_models
from trl_tip.tiny_models import build_tokenizer


FIXTURE = Path(__file__).parent / "data" / "lab"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def stored_metrics() -> dict:
    """The copy's `metrics.json`, with a clear failure when the copy is not of the current lab version."""
    path = FIXTURE / LabTask().cache_key / "metrics.json"
    assert path.exists(), (
        f"tests/data/lab holds no copy of the lab's cache {LabTask().cache_key!r}; refresh it as this module's "
        "docstring says."
    )
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def cached_lab():
    task = LabTask()
    stored_metrics()
    # Loads from the copy: prepare_lab_models trains only when the directory lacks metrics.json.
    prepared = prepare_lab_models(task, cache_dir=FIXTURE, verbose=False)
    teacher = AutoModelForCausalLM.from_pretrained(prepared["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(prepared["student"]).eval()
    return prepared, teacher, student


def test_the_copy_is_the_current_lab():
    metrics = stored_metrics()
    assert metrics["task"] == {"num_train_per_level": 1500, "num_validation_per_level": 30, "num_test_per_level": 60,
                               "seed": 0}
    assert metrics["precondition_failures"] == []


@pytest.mark.slow
def test_preconditions_hold_when_re_measured(cached_lab):
    prepared, teacher, student = cached_lab
    with torch.no_grad():
        measured = measure_preconditions(teacher, student, build_tokenizer(), prepared["dataset"], seed=0)
    assert check_preconditions(measured) == []
    stored = prepared["metrics"]["preconditions"]
    test_size = len(prepared["dataset"]["test"])
    # Greedy decoding re-done on another processor can flip a near-tied token (float32 sums in another order), which
    # changes at most a problem or two of the 180: allow two problems on every accuracy. Token counts move with them.
    tolerance = 2 / test_size
    for name in ("teacher", "student", "student_with_solution"):
        assert measured[name]["accuracy"] == pytest.approx(stored[name]["accuracy"], abs=tolerance)
        for level, values in stored[name]["levels"].items():
            level_size = test_size / len(stored[name]["levels"])
            assert measured[name]["levels"][level]["accuracy"] == pytest.approx(values["accuracy"],
                                                                               abs=2 / level_size)
    for name, mode in stored["concise_mode"].items():
        assert measured["concise_mode"][name]["accuracy"] == pytest.approx(mode["accuracy"], abs=tolerance)
        # Two problems of up to 128 tokens each, over 180 problems.
        assert measured["concise_mode"][name]["mean_completion_tokens"] == pytest.approx(
            mode["mean_completion_tokens"], abs=2 * 128 / test_size)
    # Sampled pass rates share the seed but not the exact stream across processors; the spread is what matters.
    spread = measured["student_pass_rates"]
    assert spread["between"] == pytest.approx(stored["student_pass_rates"]["between"], abs=0.1)


def test_docs_state_the_cached_preconditions():
    metrics = stored_metrics()
    measured = metrics["preconditions"]
    page = (DOCS / "lab_task.md").read_text()
    concise = measured["concise_mode"]
    quoted = [
        f"| teacher, plain prompt | {100 * measured['teacher']['accuracy']:.1f} % |",
        f"| teacher, v1 instruction | {100 * concise['v1']['accuracy']:.1f} % |",
        f"| teacher, v2 instruction | {100 * concise['v2']['accuracy']:.1f} % |",
        f"| student, plain prompt | {100 * measured['student']['accuracy']:.1f} % |",
        f"v1: {100 * concise['v1']['token_ratio']:.1f} % of the tokens",
        f"v2: {100 * concise['v2']['token_ratio']:.1f} %",
        f"{100 * measured['student_pass_rates']['between']:.1f} % between",
        f"{metrics['total_seconds']:.0f} s",
    ]
    missing = [number for number in quoted if number not in page]
    assert not missing, f"docs/lab_task.md does not state the cached lab's {missing}"
