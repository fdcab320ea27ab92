"""
Run a Python script with accelerate treating a CPU gloo world as a multi-device one. Test harness only.

    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml --num_processes 2 --mixed_precision no \
        tests/distributed/cpu_world.py SCRIPT [ARGS...]

accelerate enables FSDP (and DDP through `multi_gpu.yaml`) only on a multi-device world; on a CPU-only machine the
launched processes would fall back to one-process runs (or, with `use_cpu=True`, to DDP with the FSDP settings
silently ignored). This switch reports the gloo world as multi-device and pins the device to the CPU, so the engine
the config names is the one that runs; FSDP2's `fully_shard` itself works on CPU. DeepSpeed runs on the CPU with
`DS_ACCELERATOR=cpu`; its communication backend would first compile a shared-memory kernel (deepspeed_shm_comm), a
native build whose kernels depend on the processor's instruction set and which only DeepSpeed's inference
all-reduce uses. The harness leaves it out, so the launch does not depend on the machine's compiler, processor or
/dev/shm; training's collectives go through gloo as they would with it. The package never sees this module.
"""

import importlib
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


def _without_deepspeed_shm_op():
    # TorchBackend.__init__ looks the builder up in its module; with no op, inference_all_reduce uses gloo. (The
    # module is taken from importlib: the attribute `deepspeed.comm.torch` is the torch package, re-exported.)
    backend_module = importlib.import_module("deepspeed.comm.torch")
    backend_module.build_shm_op = lambda: None


def main():
    if len(sys.argv) < 2:
        raise SystemExit("usage: cpu_world.py SCRIPT [ARGS...]")
    PartialState._prepare_backend = _prepare_backend
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        _without_deepspeed_shm_op()
    else:
        os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
