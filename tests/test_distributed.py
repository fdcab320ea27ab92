"""Real two-process training on CPU (gloo), one trainer at a time."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "train_two_steps.py"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from trl_tip.testing import save_tiny_models

    directory = tmp_path_factory.mktemp("dist-models")
    save_tiny_models(directory)
    return directory


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["tip", "paced", "paced_sample", "opsdc", "ace"])
def test_two_process_training(trainer, model_dir, tmp_path):
    output = tmp_path / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
               "--trainer", trainer, "--models", str(model_dir), "--output", str(output)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report["world_size"] == 2
    assert len(report["losses"]) == 2 and all(math.isfinite(loss) for loss in report["losses"])
    assert report["changed"]
    assert report["identical_across_ranks"]
    assert report["collectives_in_loss"] == []
    if trainer == "paced_sample":
        assert report["draw_steps"] == [0, 1] and report["draws_are_slices_of_the_global_draw"]
