"""
Run a Python script with accelerate treating a CPU gloo world as a multi-device one. Test harness only.

    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml --num_processes 2 --mixed_precision no \
        tests/distributed/cpu_world.py SCRIPT [ARGS...]

accelerate enables FSDP (and DDP through `multi_gpu.yaml`) only on a multi-device world; on a CPU-only machine the
launched processes would fall back to one-process runs (or, with `use_cpu=True`, to DDP with the FSDP settings
silently ignored). This switch reports the gloo world as multi-device and pins the device to the CPU, so the engine
the config names is the one that runs; FSDP2's `fully_shard` itself works on CPU. DeepSpeed needs no switch
(`DS_ACCELERATOR=cpu`), and the package never sees this module.
"""

import os
import runpy
import sys

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType


_original_prepare_backend = PartialState._prepare_backend


def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if launched and not cpu and not deepspeed and not torch.cuda.is_available():
        return "gloo", DistributedType.MULTI_GPU
    return _original_prepare_backend(self, cpu, sagemaker_dp, backend)


def main():
    if len(sys.argv) < 2:
        raise SystemExit("usage: cpu_world.py SCRIPT [ARGS...]")
    PartialState._prepare_backend = _prepare_backend
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
