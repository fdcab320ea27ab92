"""The served-teacher measurements in the docs are rendered from the JSON their scripts wrote."""

import importlib.util
import json
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"_served_docs_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(page: str, name: str) -> str:
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    return text.split(f"<!-- {name}:start -->\n", 1)[1].split(f"<!-- {name}:end -->", 1)[0]


@pytest.mark.parametrize(
    ("script", "results", "page", "section", "render"),
    [
        ("served_selection", "served_selection.json", "tip_distill.md", "served-selection", "section"),
        ("memory", "memory_served.json", "benchmarks.md", "memory-served", "served_section"),
    ],
)
def test_served_teacher_sections_are_rendered_from_their_json(script, results, page, section, render):
    module = _module(script)
    data = json.loads((ROOT / "benchmarks" / "results" / results).read_text())
    assert _section(page, section) == getattr(module, render)(data), (
        f"docs/{page} is out of date: run `python benchmarks/{script}.py "
        f"{'--served ' if script == 'memory' else ''}--load benchmarks/results/{results} --write docs/{page}`"
    )


def test_the_overlap_covers_every_rule_ratio_and_k_and_the_server_check():
    data = json.loads((ROOT / "benchmarks" / "results" / "served_selection.json").read_text())
    assert data["top_ks"] == [1, 8, 64]
    for method in data["methods"]:
        for ratio in data["ratios"]:
            for k in data["top_ks"]:
                assert 0.0 <= data["overlap"][f"{method}|{ratio}|{k}"] <= 1.0
    # The rule that reads the student alone keeps exactly what it keeps with a local teacher.
    assert all(data["overlap"][f"entropy_topk|{ratio}|{k}"] == 1.0 for ratio in data["ratios"] for k in data["top_ks"])
    assert data["server_check"] is not None
