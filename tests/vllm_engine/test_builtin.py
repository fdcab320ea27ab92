"""
The built-in task under vLLM, as a user on a CPU machine runs it: `examples/tip_distill.py --use_vllm` and
`trl-tip eval --backend vllm` on the built-in student, whose attention shape vLLM's CPU kernels accept.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=TIMEOUT_S, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def test_tip_distill_example_generates_with_vllm_on_the_builtin_task(arithmetic_models, tmp_path):
    output = tmp_path / "out"
    result = _run([
        sys.executable, str(ROOT / "examples" / "tip_distill.py"), "--use_vllm", "--vllm_mode", "colocate",
        "--max_steps", "2", "--num_eval_problems", "20", "--output_dir", str(output),
    ])  # fmt: skip
    assert "student accuracy after:" in result.stdout, result.stdout[-3000:]
    assert (output / "model.safetensors").is_file()
    # The trainer's colocated engine started and loaded the student: only vLLM's weight loader prints this line. (That
    # every rollout then comes from the engine is asserted on the trainers themselves, in test_trainers.py.)
    assert "Loading safetensors checkpoint shards" in result.stderr, result.stderr[-3000:]


def test_eval_with_vllm_on_the_builtin_student(arithmetic_models, tmp_path):
    output = tmp_path / "eval"
    _run([
        sys.executable, "-m", "trl_tip.cli", "eval", "--model", arithmetic_models["student"], "--dataset", "builtin",
        "--num_problems", "40", "--n", "2", "--backend", "vllm", "--dtype", "float32", "--enforce_eager",
        "--output_dir", str(output),
    ])  # fmt: skip
    summary = json.loads((output / "summary.json").read_text())
    assert summary["backend"] == "vllm", summary
    (records_path,) = output.glob("*.jsonl")
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    assert len(records) == 40 and all(len(record["completions"]) == 2 for record in records)
