"""
Smoke test of every trl_tip trainer on one GPU, offline: two training steps each, in bf16, in every mode the machine
supports, with a one-line verdict per trainer and mode.

Modes:
- `transformers`: generation with transformers, TRL's CUDA/Triton chunked kernels in the loss;
- `qlora`: a 4-bit nf4 student base with LoRA adapters (needs bitsandbytes);
- `vllm-colocate`: generation with vLLM inside the training process (needs vllm).

    bash scripts/gpu_smoke.sh             # on a GPU machine
    python scripts/gpu_smoke.py --device cpu --modes transformers   # the same code path on a CPU, fp32

Exit status 1 if any mode that could run failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import traceback


def _common(args, output_dir):
    on_gpu = args.device == "cuda"
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": 4,
        "max_steps": args.steps,
        "learning_rate": 1e-4,
        "max_completion_length": 24,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": on_gpu,
        "use_cpu": not on_gpu,
        "seed": 0,
    }


def _vllm(mode):
    if mode != "vllm-colocate":
        return {}
    return {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.15,
            "vllm_max_model_length": 256, "vllm_enable_sleep_mode": False}


def _model_kwargs(mode):
    if mode != "qlora":
        return {}
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    return {
        "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_compute_dtype=torch.bfloat16),
        "peft_config": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    }


def build_tip(paths, dataset, mode, args, output_dir):
    from trl_tip import TipDistillConfig, TipDistillTrainer

    config = TipDistillConfig(token_selection="soft_or", token_ratio=0.5, **_common(args, output_dir), **_vllm(mode))
    return TipDistillTrainer(model=paths["student"], teacher_model=paths["teacher"], args=config,
                             train_dataset=dataset, **_model_kwargs(mode))


def build_opsdc(paths, dataset, mode, args, output_dir):
    from trl_tip import OPSDCConfig, OPSDCTrainer

    config = OPSDCConfig(teacher_refresh_steps=1, **_common(args, output_dir), **_vllm(mode))
    return OPSDCTrainer(model=paths["student"], args=config, train_dataset=dataset, **_model_kwargs(mode))


def build_paced(paths, dataset, mode, args, output_dir):
    from trl_tip import PacedConfig, PacedTrainer

    # Uniform weights: the random tiny student solves nothing, and PACED would (rightly) weigh every problem 0.
    config = PacedConfig(pass_rate_rollouts=2, paced_alpha=0.0, paced_beta=0.0, **_common(args, output_dir),
                         **_vllm(mode))
    return PacedTrainer(model=paths["student"], teacher_model=paths["teacher"], args=config, train_dataset=dataset,
                        reward_funcs="math", **_model_kwargs(mode))


def _distinct_characters(completions, **kwargs):
    # Varies between rollouts of a random tiny model, so GRPO has non-zero advantages to train on.
    return [len(set(completion[0]["content"])) / 10 for completion in completions]


def build_ace(paths, dataset, mode, args, output_dir):
    from trl_tip import ACEGRPOConfig, ACEGRPOTrainer

    config = ACEGRPOConfig(num_generations=4, beta=0.0, **_common(args, output_dir), **_vllm(mode))
    return ACEGRPOTrainer(model=paths["student"], reward_funcs=_distinct_characters, args=config,
                          train_dataset=dataset, **_model_kwargs(mode))


TRAINERS = {"tip": build_tip, "opsdc": build_opsdc, "paced": build_paced, "ace": build_ace}
MODES = ("transformers", "qlora", "vllm-colocate")


def _skip_reason(mode, device):
    if mode == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes not installed"
    if mode == "vllm-colocate":
        if device != "cuda":
            return "vllm needs a GPU"
        if importlib.util.find_spec("vllm") is None:
            return "vllm not installed"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--trainers", nargs="+", choices=sorted(TRAINERS), default=sorted(TRAINERS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM colocate mode joins a one-process group; a plain `python` launch has none of torchrun's variables.
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29517"}.items():
        os.environ.setdefault(key, value)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("verdict: no CUDA device visible; run with --device cpu to exercise the same code on a CPU")
        return 1

    from trl_tip.tasks import build_arithmetic_dataset
    from trl_tip.tiny_models import save_tiny_models

    dataset = build_arithmetic_dataset()["train"].select(range(16))
    failures = 0
    with tempfile.TemporaryDirectory() as workdir:
        paths = save_tiny_models(os.path.join(workdir, "models"))
        for name in args.trainers:
            for mode in args.modes:
                reason = _skip_reason(mode, args.device)
                if reason:
                    print(f"{name:<6} {mode:<14} skipped: {reason}", flush=True)
                    continue
                started = time.perf_counter()
                try:
                    trainer = TRAINERS[name](paths, dataset, mode, args, os.path.join(workdir, f"{name}-{mode}"))
                    trainer.train()
                    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
                    if len(losses) != args.steps or not all(torch.isfinite(torch.tensor(losses))):
                        raise RuntimeError(f"expected {args.steps} finite losses, got {losses}")
                    shown = ", ".join(f"{loss:.4f}" for loss in losses)
                    print(f"{name:<6} {mode:<14} ok ({shown}; {time.perf_counter() - started:.0f} s)", flush=True)
                except Exception as error:  # report every mode, then fail at the end
                    failures += 1
                    print(f"{name:<6} {mode:<14} FAILED: {type(error).__name__}: {error}", flush=True)
                    traceback.print_exc(file=sys.stderr)
                finally:
                    trainer = None
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
    print(f"verdict: {'all passed' if failures == 0 else f'{failures} failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
