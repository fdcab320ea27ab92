"""
Real two-process training on CPU (gloo): every trainer under DDP, DeepSpeed ZeRO-2, ZeRO-3 and FSDP2.

Each engine is one launch (one pair of processes) that trains the four trainers one after another for two steps
(tests/distributed/train_two_steps.py). DeepSpeed and FSDP2 are launched by `accelerate launch` from the configs in
examples/accelerate_configs/ (those of the README's commands, `--num_processes 2 --mixed_precision no`), through
tests/distributed/cpu_world.py, which lets accelerate treat the gloo world as multi-device; DDP is accelerate's CPU
world under `torchrun`. The harness keeps DeepSpeed from building its shared-memory communication op, a native
kernel only its inference all-reduce uses (see cpu_world.py); training communicates through gloo either way.

Tolerance against DDP. The engines run the same per-rank computation; they differ in how the two ranks' gradients
are reduced (bucketed all-reduce, reduce-scatter, pre- or post-division), so a gradient element differs by a few
float32 roundings: |δg| ≤ 4·ε32·G, with G the largest gradient norm logged (which bounds every element; the two ranks'
gradients are of the same size here, so their sum does not cancel). Adam's update lr·m̂/(√v̂ + ε_A) moves by at most
lr·|δg|/ε_A for a gradient error δg; over the two steps, the second inheriting the first's parameter difference
through its gradient (of the same order at this learning rate), the parameters differ by at most
2 · steps · lr · 4·ε32·G / ε_A. The runs use ε_A = 1e-3, so this is ~1e-5 for G ~ 0.5.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "train_two_steps.py"
CPU_WORLD = ROOT / "tests" / "distributed" / "cpu_world.py"
CONFIGS = ROOT / "examples" / "accelerate_configs"
TRAINERS = ("tip", "paced", "opsdc", "ace")
ENGINE_CONFIGS = {"zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml", "fsdp2": "fsdp2.yaml"}
DISTRIBUTED_TYPES = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}
# A launch takes about a minute on two idle cores; a loaded machine may take several times that. One that runs
# past this limit is hung (a rank died while its peer waits in a collective) and is killed.
LAUNCH_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(engine: str, *script_args: str) -> list[str]:
    """The command a test runs for `engine`: torchrun for DDP, `accelerate launch` with the engine's config else."""
    if engine == "ddp":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                *script_args]
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
            "--config_file", str(CONFIGS / ENGINE_CONFIGS[engine]), "--num_processes", "2",
            "--mixed_precision", "no", "--main_process_port", str(_free_port()), str(CPU_WORLD), *script_args]


def launch_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
            "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def run_launch(command: list[str]) -> subprocess.CompletedProcess:
    """
    Run a two-process launch to its end, or kill all of it after LAUNCH_TIMEOUT_S. The launcher's workers hold its
    output pipes: killing the launcher alone (what `subprocess.run(timeout=...)` does) would leave the test waiting
    on them, so the launch runs in a session of its own, killed as a whole.
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=launch_env(),
                               cwd=ROOT, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"no exit within {LAUNCH_TIMEOUT_S} s: {' '.join(command)}\n{stderr[-6000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from trl_tip.tiny_models import save_tiny_models

    directory = tmp_path_factory.mktemp("dist-models")
    save_tiny_models(directory)
    return directory


@pytest.fixture(scope="module")
def engine_runs(model_dir, tmp_path_factory):
    """
    `engine -> output directory` of its launch, each engine launched once, on first use. A launch that fails is not
    retried: the engine's other tests fail at once with the first failure.
    """
    done: dict[str, Path] = {}
    failed: dict[str, str] = {}

    def run(engine: str) -> Path:
        if engine in failed:
            pytest.fail(f"the {engine} launch failed (see its first test): {failed[engine]}")
        if engine not in done:
            if engine != "ddp":
                pytest.importorskip("deepspeed" if engine.startswith("zero") else "torch.distributed.fsdp")
            output = tmp_path_factory.mktemp(f"dist-{engine}")
            command = launch_command(engine, str(SCRIPT), "--engine", engine, "--trainers", ",".join(TRAINERS),
                                     "--models", str(model_dir), "--output-dir", str(output))
            try:
                result = run_launch(command)
                assert result.returncode == 0, f"exit status {result.returncode}\n{result.stderr[-6000:]}"
            except AssertionError as error:
                failed[engine] = str(error).splitlines()[0]
                raise
            done[engine] = output
        return done[engine]

    return run


def _report(directory: Path, trainer: str) -> dict:
    return json.loads((directory / f"{trainer}.json").read_text())


@pytest.mark.slow
def test_paced_sampling_ranks_draw_disjoint_slices_of_one_global_draw(model_dir, tmp_path):
    command = launch_command("ddp", str(SCRIPT), "--engine", "ddp", "--trainers", "paced_sample", "--models",
                             str(model_dir), "--output-dir", str(tmp_path))
    result = run_launch(command)
    assert result.returncode == 0, result.stderr[-6000:]
    report = _report(tmp_path, "paced_sample")
    assert report["world_size"] == 2 and report["identical_across_ranks"]
    assert len(report["losses"]) == 2 and all(math.isfinite(loss) for loss in report["losses"])
    assert report["paced_draws"] == {"steps": [0, 1], "slices_of_the_global_draw": True}


def ddp_tolerance(report: dict) -> float:
    """2 · steps · lr · 4·ε32·G / ε_A (module docstring)."""
    steps = len(report["losses"])
    gradient_bound = max(report["grad_norms"])
    epsilon32 = torch.finfo(torch.float32).eps
    return 2 * steps * report["learning_rate"] * 4 * epsilon32 * gradient_bound / report["adam_epsilon"]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp2"])
def test_two_process_training(engine, trainer, engine_runs):
    report = _report(engine_runs(engine), trainer)
    assert report["world_size"] == 2
    assert report["distributed_type"] == DISTRIBUTED_TYPES[engine]
    assert len(report["losses"]) == 2 and all(math.isfinite(loss) for loss in report["losses"])
    assert report["changed"]
    assert report["identical_across_ranks"]
    if engine in ("ddp", "zero2"):
        # With replicated weights nothing may communicate inside the wrapped forward (DDP's own collectives would
        # interleave); ZeRO-3 and FSDP2 gather their weights there by design.
        assert report["collectives_in_loss"] == []
    if engine == "ddp" and trainer in ("paced", "opsdc"):
        # The logged first-step loss (the mean of the ranks' losses) is the weighted mean of rollout means over the
        # whole two-process batch (OPSDC: the plain mean over rollouts), computed by hand in float64: each rank must
        # divide the global normaliser by the number of processes, as DDP averages gradients. float32 chunked
        # kernels against float64 full logits differ by ~1e-6 relative; 1e-4 leaves room and is far below the
        # factor 2 a missing division would give. (The sharded engines match DDP's parameters, checked below.)
        assert report["reference_first_loss"] > 0
        assert report["losses"][0] == pytest.approx(report["reference_first_loss"], rel=1e-4)
    if engine != "ddp":
        reference_report = _report(engine_runs("ddp"), trainer)
        params = torch.load(engine_runs(engine) / f"{trainer}.pt")
        reference = torch.load(engine_runs("ddp") / f"{trainer}.pt")
        assert params.keys() == reference.keys()
        difference = max((params[name] - reference[name]).abs().max().item() for name in reference)
        assert difference <= ddp_tolerance(reference_report), (engine, trainer, difference)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp2"])
def test_opsdc_snapshot_refresh(engine, engine_runs):
    # teacher_refresh_steps=2, two steps: the snapshot of step 0 stays frozen through step 1, and the refresh after
    # step 2 makes it the student again (gathered from the shards on every rank and compared exactly).
    snapshot = _report(engine_runs(engine), "opsdc")["snapshot"]
    assert snapshot["1"] == {"teacher_equals_student": False, "teacher_equals_step0": True, "refreshes": 1}
    assert snapshot["2"] == {"teacher_equals_student": True, "teacher_equals_step0": False, "refreshes": 2}


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["tip", "paced", "opsdc"])
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp2"])
def test_teacher_parameter_bytes_per_rank(engine, trainer, engine_runs):
    # Sharded engines hold about 1/world_size of the teacher on each rank, replicated ones all of it. FSDP2 splits
    # dim 0. ZeRO-3 pads each parameter to equal slices, and besides its slice keeps a whole copy of every parameter
    # under `stage3_param_persistence_threshold` elements (DeepSpeed's default, 1e5, covers every weight of these
    # tiny models, only norms and biases of real ones): the slices are what is checked here.
    teacher = _report(engine_runs(engine), trainer)["teacher_parameter_bytes"]
    if engine in ("zero3", "fsdp2"):
        # Padding adds at most world_size - 1 elements per parameter to a rank's slice.
        assert teacher["local"] - teacher["persistent"] <= 0.55 * teacher["full"], teacher
    else:
        assert teacher["local"] == teacher["full"], teacher


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp2"])
def test_pass_at_k_callback_uneven_problems(engine, engine_runs):
    # 3 problems on 2 processes: rank 1 pads its share with problem 0 and drops it, so both make the same sharded
    # `generate` calls (a mismatch aborts FSDP2's collectives and hangs ZeRO-3's), and every rank sees all 3 graded.
    result = _report(engine_runs(engine), "tip")["uneven_pass_at_k"]
    assert result["num_problems_per_rank"] == [3, 3]
    assert set(result["pass_at_k"]) == {"1", "2"}
    assert all(0.0 <= value <= 1.0 for value in result["pass_at_k"].values())


# The examples as the README launches them (its 8-GPU command uses deepspeed_zero3.yaml), two processes on CPU: two
# steps on the built-in task, with the before/after evaluation every rank takes part in. `--ddp_backend gloo`: on
# CPU, DeepSpeed would otherwise pick its oneCCL backend.
EXAMPLE_RUNS = {
    "tip-zero3": ("zero3", "tip_distill.py", ["--per_device_train_batch_size", "4"], "student accuracy after:"),
    "paced-fsdp2": ("fsdp2", "paced_distill.py", ["--per_device_train_batch_size", "4", "--num_train_problems", "16",
                                                  "--pass_rate_rollouts", "2"], "student accuracy after:"),
    "ace-zero3": ("zero3", "ace_grpo.py", ["--per_device_train_batch_size", "8", "--num_generations", "4",
                                           "--num_eval_samples", "2"], "pass@k on 3 test problems"),
}


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(EXAMPLE_RUNS))
def test_example_trains_and_evaluates_sharded(run, tmp_path):
    engine, script, extra, expected = EXAMPLE_RUNS[run]
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    output = tmp_path / "out"
    command = launch_command(engine, str(ROOT / "examples" / script), "--max_steps", "2", "--ddp_backend", "gloo",
                             "--num_eval_problems", "3", "--output_dir", str(output), *extra)
    result = run_launch(command)
    assert result.returncode == 0, result.stderr[-6000:]
    assert expected in result.stdout, result.stdout[-3000:]
    assert (output / "model.safetensors").is_file()
