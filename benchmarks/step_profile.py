"""
Where one whole training step goes, per trainer, against TRL's own trainer measured in the same run.

Each variant trains `1 + --steps` optimiser steps (the first is a warm-up, not reported) in its own process, with its
methods wrapped by timers, and reports the median over the measured steps of the time spent in:

- `generation`: the rollouts (`_generate`; transformers' `generate` here, vLLM where enabled);
- `teacher forward`: the teacher's trunk (every hidden state the loss reads; GRPO and ACE: the log-prob passes without
  gradient, i.e. the reference model scoring the rollouts for GRPO's KL penalty or ACE's confidence shift), and
  `teacher lm_head`: every projection of the teacher's hidden states onto the vocabulary, forward and backward (in
  TRL's loss kernel or in trl_tip's statistics pass);
- `student forward`: the student's trunk (GRPO and ACE: the policy's log-prob pass with gradient, head included);
- `selection/statistics`: trl_tip's per-token statistics pass and selection rule (none in TRL's trainers);
- `loss`: the rest of `compute_loss` (the divergence kernel with the student's projection, PACED/TIP bookkeeping);
- `backward`, `optimiser` (`optimizer.step()`), and `other` (data, rewards, gradient clipping, logging).

Phases are exclusive (a nested phase is subtracted from its parent) and add up to the step. On CUDA, phases are timed
with CUDA events and the peak is `torch.cuda.max_memory_allocated` over the measured steps; on CPU, one thread per
worker, times are the process's CPU time (less sensitive to other load on a shared machine than wall time) and the
peak is the rise of the resident set over the measured steps.

Shapes: `builtin`, the built-in arithmetic task (its teacher and student, 32 rollouts of ≤ 32 tokens); and
`lm-head-heavy`, the shape of benchmarks/token_selection.py at V = 151,936 (random Qwen2 models of hidden size 256,
the teacher two layers deep, 4 prompts × 128 completion tokens), where the vocabulary projection dominates. PACED,
OPSDC and ACE run on the built-in task only (they need answers a reward can check).

    python benchmarks/step_profile.py                             # both shapes, tables on stdout
    python benchmarks/step_profile.py --write docs/benchmarks.md

With `--use_vllm` (an environment with vLLM, e.g. the `.venv-vllm` that `make test-vllm` builds), each variant of the
built-in shape runs twice, generating with transformers and with vLLM colocated in the training process (on a CPU:
trl_tip's CPU path, float32, eager), and the tables give both, the weight push counted in `generation`:

    .venv-vllm/bin/python benchmarks/step_profile.py --use_vllm --shapes builtin --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import reset_peak_rss as _reset_peak_rss, status_kib as _status_kib, write_section  # noqa: E402


PHASES = ("generation", "teacher forward", "teacher lm_head", "student forward", "selection/statistics", "loss",
          "backward", "optimiser", "other")
# Variant -> (trainer, settings, baseline variant).
DISTILLATION = "trl-distillation"
GRPO_WITH_REFERENCE = "trl-grpo-reference"
VARIANTS = {
    DISTILLATION: ("trl_distillation", {}, None),
    "tip-soft_or-0.5": ("tip", {"token_selection": "soft_or", "token_ratio": 0.5}, DISTILLATION),
    "tip-entropy_sample-1.0": ("tip", {"token_selection": "entropy_sample", "token_ratio": 1.0}, DISTILLATION),
    "tip-entropy_sample-0.5": ("tip", {"token_selection": "entropy_sample", "token_ratio": 0.5}, DISTILLATION),
    "tip-entropy_topk-0.5": ("tip", {"token_selection": "entropy_topk", "token_ratio": 0.5}, DISTILLATION),
    "paced-weight": ("paced", {"paced_sampling": "weight"}, DISTILLATION),
    "paced-sample": ("paced", {"paced_sampling": "sample"}, DISTILLATION),
    "opsdc": ("opsdc", {}, DISTILLATION),
    "trl-grpo": ("trl_grpo", {}, None),
    # GRPO with a KL penalty scores the completions under a frozen reference, as ACE does at beta = 0 for its
    # confidence shift: the baseline for what ACE adds to a step.
    GRPO_WITH_REFERENCE: ("trl_grpo", {"beta": 0.04}, None),
    "ace": ("ace", {"ace_alpha": 1.0}, GRPO_WITH_REFERENCE),
}
SHAPES = {
    "builtin": list(VARIANTS),
    "lm-head-heavy": [DISTILLATION, "tip-soft_or-0.5", "tip-entropy_sample-1.0", "tip-entropy_sample-0.5",
                      "tip-entropy_topk-0.5"],
}


# --- worker: one variant, one process ------------------------------------------------------------------------------


class PhaseTimer:
    """Exclusive time per phase: a phase entered inside another is subtracted from it. CUDA events on GPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.stack: list[list] = []
        self.spans: list[tuple[str, object, object, list]] = []  # (phase, start, end, children spans)

    def _mark(self):
        import torch

        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.process_time()

    @staticmethod
    def _elapsed(start, end) -> float:
        return start.elapsed_time(end) / 1000 if hasattr(start, "elapsed_time") else end - start

    def wrap(self, phase: str, function, phase_of_call=None):
        def timed(*args, **kwargs):
            name = phase_of_call(*args, **kwargs) if phase_of_call else phase
            if name is None:
                return function(*args, **kwargs)
            children: list = []
            self.stack.append(children)
            start = self._mark()
            try:
                return function(*args, **kwargs)
            finally:
                end = self._mark()
                self.stack.pop()
                span = (name, start, end, children)
                (self.stack[-1] if self.stack else self.spans).append(span)

        return timed

    def totals(self) -> dict[str, float]:
        """Exclusive seconds per phase of the spans recorded since the last call (synchronises on CUDA)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = defaultdict(float)

        def add(span) -> float:
            name, start, end, children = span
            inclusive = self._elapsed(start, end)
            totals[name] += inclusive - sum(add(child) for child in children)
            return inclusive

        for span in self.spans:
            add(span)
        self.spans = []
        return dict(totals)


def _builtin_setup():
    from transformers import AutoTokenizer

    from trl_tip.tasks import prepare_arithmetic_models

    prepared = prepare_arithmetic_models(verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(prepared["student"], padding_side="left")
    # 512 problems: PACED estimates every training problem's pass rate before training (outside any step).
    return {"student": prepared["student"], "teacher": prepared["teacher"], "tokenizer": tokenizer,
            "train": prepared["dataset"]["train"].select(range(512)), "batch": 32, "completion_length": 32,
            "temperature": 1.0}


def _heavy_setup(device, dtype):
    import torch
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trl_tip.tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    vocab, prompt_length, completion_length = 151_936, 16, 128

    def model(layers, seed):
        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=prompt_length + completion_length + 64, tie_word_embeddings=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)

    # Plain-text prompts of 16 bytes (the byte-level tokenizer: 16 tokens each).
    prompts = [f"{i:04d} " + "abcdefghij"[: prompt_length - 5] for i in range(64)]
    train = Dataset.from_dict({"prompt": prompts, "answer": ["0"] * len(prompts)})
    return {"student": model(1, 1), "teacher": model(2, 2).eval(), "tokenizer": tokenizer, "train": train,
            "batch": 4, "completion_length": completion_length, "temperature": 1.0}


def _trainer(variant: str, setup: dict, steps: int, cuda: bool, use_vllm: bool = False):
    from trl import DistillationConfig, DistillationTrainer, GRPOConfig, GRPOTrainer

    from trl_tip import (ACEGRPOConfig, ACEGRPOTrainer, OPSDCConfig, OPSDCTrainer, PacedConfig, PacedTrainer,
                         TipDistillConfig, TipDistillTrainer, math_reward)
    from trl_tip.vllm_cpu import platform_vllm_generation

    kind, settings, _ = VARIANTS[variant]
    common = {
        "output_dir": "/tmp/trl_tip_step_profile", "report_to": "none", "save_strategy": "no", "logging_steps": 1,
        "max_steps": steps, "per_device_train_batch_size": setup["batch"], "learning_rate": 1e-5,
        "max_completion_length": setup["completion_length"], "temperature": setup["temperature"], "bf16": cuda,
        "use_cpu": not cuda, "gradient_checkpointing": False, "disable_tqdm": True, "seed": 0,
    }
    if use_vllm:
        common.update(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=512,
                      vllm_gpu_memory_utilization=0.3)
    models = {"model": setup["student"], "processing_class": setup["tokenizer"], "train_dataset": setup["train"]}
    if kind == "trl_distillation":
        # TRL's own trainers take trl_tip's weight path on vLLM's CPU build too (trl_tip's trainers take it alone).
        config = DistillationConfig(**common)
        with platform_vllm_generation(config):
            return DistillationTrainer(teacher_model=setup["teacher"], args=config, **models)
    if kind == "tip":
        return TipDistillTrainer(teacher_model=setup["teacher"], args=TipDistillConfig(**common, **settings), **models)
    if kind == "paced":
        # K = 4 for the estimation before training (not part of any step).
        config = PacedConfig(**common, **settings, pass_rate_rollouts=4)
        return PacedTrainer(teacher_model=setup["teacher"], args=config, reward_funcs=[math_reward], **models)
    if kind == "opsdc":
        return OPSDCTrainer(args=OPSDCConfig(**common), **models)
    grpo = {**common, "num_generations": 8, "loss_type": "dapo", "beta": 0.0}
    if kind == "trl_grpo":
        config = GRPOConfig(**{**grpo, **settings})
        with platform_vllm_generation(config):
            return GRPOTrainer(reward_funcs=[math_reward], args=config, **models)
    return ACEGRPOTrainer(reward_funcs=[math_reward], args=ACEGRPOConfig(**grpo, **settings), **models)


def _instrument(trainer, timer: PhaseTimer):
    """Time the trainer's phases; returns the context in which TRL's own tile projections are timed too."""
    import torch
    from transformers import TrainerCallback

    import trl_tip.chunked_stats as chunked_stats
    import trl_tip.losses as losses
    from trl_tip._trl_compat import tile_projection_wrapped

    teacher = getattr(trainer, "teacher_model", None)
    teacher_heads = set()
    if teacher is not None:
        head = trainer.accelerator.unwrap_model(teacher).get_output_embeddings()
        teacher_heads.add(id(head.weight))

    def forward_phase(*args, **kwargs):
        # The teacher (and GRPO's old/reference log-probs) run without gradient, the student with it.
        return "student forward" if torch.is_grad_enabled() else "teacher forward"

    trainer._generate = timer.wrap("generation", trainer._generate)
    if hasattr(trainer, "_get_per_token_logps_and_entropies"):
        trainer._get_per_token_logps_and_entropies = timer.wrap(
            None, trainer._get_per_token_logps_and_entropies, forward_phase)
    else:
        trainer._get_last_hidden_state = timer.wrap(None, trainer._get_last_hidden_state, forward_phase)
    trainer.compute_loss = timer.wrap("loss", trainer.compute_loss)
    trainer.accelerator.backward = timer.wrap("backward", trainer.accelerator.backward)
    # The statistics pass and the rules, as `selective_divergence_loss` looks them up.
    for name in ("token_stats", "student_entropy", "select_tokens"):
        setattr(losses, name, timer.wrap("selection/statistics", getattr(losses, name)))

    def projection_phase(tile, hidden_chunk, weight, *args, **kwargs):
        return "teacher lm_head" if id(weight) in teacher_heads else None

    def timed_projection(project):
        return timer.wrap(None, project, projection_phase)

    chunked_stats.project_tile = timed_projection(chunked_stats.project_tile)

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timer.step_start = timer._mark()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            timer.optimiser_start = timer._mark()

        def on_optimizer_step(self, args, state, control, **kwargs):
            timer.spans.append(("optimiser", timer.optimiser_start, timer._mark(), []))

        def on_step_end(self, args, state, control, **kwargs):
            end = timer._mark()
            phases = timer.totals()
            phases["step"] = timer._elapsed(timer.step_start, end)
            phases["other"] = phases["step"] - sum(v for k, v in phases.items() if k != "step")
            timer.steps.append(phases)

    timer.steps = []
    trainer.add_callback(StepClock())
    return tile_projection_wrapped(timed_projection)


def run_worker(variant: str, shape: str, steps: int, use_vllm: bool = False) -> dict:
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)
    device = torch.device("cuda" if cuda else "cpu")
    setup = _builtin_setup() if shape == "builtin" else _heavy_setup(device, torch.bfloat16 if cuda else torch.float32)
    trainer = _trainer(variant, setup, 1 + steps, cuda, use_vllm)
    timer = PhaseTimer(cuda)
    projections_timed = _instrument(trainer, timer)

    class Peak(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:  # after the warm-up step
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    self.base = torch.cuda.memory_allocated()
                else:
                    _reset_peak_rss()
                    self.base = _status_kib("VmRSS") * 1024

    peak = Peak()
    trainer.add_callback(peak)
    with projections_timed:
        trainer.train()
    if cuda:
        peak_bytes = torch.cuda.max_memory_allocated() - peak.base
    else:
        peak_bytes = _status_kib("VmHWM") * 1024 - peak.base
    measured = timer.steps[1:]
    median = {key: statistics.median(step.get(key, 0.0) for step in measured) for key in ("step", *PHASES)}
    return {"variant": variant, "shape": shape, "phases": median, "peak_bytes": max(peak_bytes, 0),
            "steps": len(measured), "generation": "vllm" if use_vllm else "transformers"}


# --- driver ----------------------------------------------------------------------------------------------------------


def run_all(args) -> list[dict]:
    rows = []
    runs = [(shape, variant, False) for shape in args.shapes for variant in SHAPES[shape]]
    if args.use_vllm:
        # vLLM loads the models from their paths: the built-in shape only.
        runs += [(shape, variant, True) for shape, variant, _ in runs if shape == "builtin"]
    for shape, variant, use_vllm in runs:
        if args.variants and variant not in args.variants:
            continue
        command = [sys.executable, __file__, "--worker", variant, "--shape", shape, "--steps", str(args.steps)]
        command += ["--use_vllm"] if use_vllm else []
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                                               os.environ.get("PYTHONPATH", "")])}
        if not args.cuda:
            env["OMP_NUM_THREADS"] = "1"
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"{variant} ({shape}) failed:\n{result.stderr[-3000:]}")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"  {shape:<14} {variant:<24} {row['generation']:<12} step {row['phases']['step']:.3f} s", flush=True)
    return rows


def _without_generation(phases: dict) -> float:
    return phases["step"] - phases["generation"]


def table(rows: list[dict], shape: str, generation: str = "transformers") -> str:
    rows = [row for row in rows if row.get("generation", "transformers") == generation]
    shown = [phase for phase in PHASES if any(row["phases"][phase] > 0 for row in rows if row["shape"] == shape)]
    header = ("| variant | step (s) | vs baseline | step without generation (s) | vs baseline | "
              + " | ".join(f"{phase} (s, share)" for phase in shown))
    lines = [header + " | peak memory (MiB) |", "|---|---:|---:|---:|---:|" + "---:|" * len(shown) + "---:|"]
    by_variant = {row["variant"]: row for row in rows if row["shape"] == shape}
    for variant, row in by_variant.items():
        phases = row["phases"]
        baseline = by_variant.get(VARIANTS[variant][2], {}).get("phases")
        ratio = f"{phases['step'] / baseline['step']:.2f}x" if baseline else "—"
        rest = _without_generation(phases)
        rest_ratio = f"{rest / _without_generation(baseline):.2f}x" if baseline else "—"
        cells = [f"{phases[phase]:.3f} ({phases[phase] / phases['step']:.0%})" for phase in shown]
        lines.append(f"| {variant} | {phases['step']:.3f} | {ratio} | {rest:.3f} | {rest_ratio} | "
                     + " | ".join(cells) + f" | {row['peak_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def generation_table(rows: list[dict], shape: str) -> str:
    """Each variant's step with transformers' and with vLLM's generation, side by side, from the same run."""
    by_generation = {
        generation: {row["variant"]: row["phases"] for row in rows
                     if row["shape"] == shape and row.get("generation", "transformers") == generation}
        for generation in ("transformers", "vllm")
    }
    lines = ["| variant | step, transformers generation (s) | generation share | step, vLLM generation (s) | "
             "generation share | vLLM step vs transformers step |", "|---|---:|---:|---:|---:|---:|"]
    for variant, hf in by_generation["transformers"].items():
        vllm = by_generation["vllm"].get(variant)
        if vllm is None:
            continue
        lines.append(f"| {variant} | {hf['step']:.3f} | {hf['generation'] / hf['step']:.0%} | {vllm['step']:.3f} | "
                     f"{vllm['generation'] / vllm['step']:.0%} | {vllm['step'] / hf['step']:.2f}x |")
    return "\n".join(lines)


def _saved_or_added(fraction: float) -> str:
    # A negative saving is extra time: say so rather than print "-35% saved".
    return f"saves {fraction:.1%} of" if fraction >= 0 else f"costs {-fraction:.1%} more than"


def savings(rows: list[dict], shape: str) -> str:
    """
    What TIP ρ = 0.5 saves of TRL's step, ACE's step against GRPO with a reference model, and the teacher projection
    of the entropy rules at ρ = 0.5 vs ρ = 1.
    """
    by_variant = {row["variant"]: row["phases"] for row in rows if row["shape"] == shape}
    lines = []
    trl = by_variant.get(DISTILLATION)
    if trl:
        for variant in ("tip-soft_or-0.5", "tip-entropy_sample-0.5", "tip-entropy_topk-0.5"):
            if variant in by_variant:
                saved = 1 - by_variant[variant]["step"] / trl["step"]
                rest = 1 - _without_generation(by_variant[variant]) / _without_generation(trl)
                lines.append(f"- {variant}: {_saved_or_added(saved)} TRL's step end to end "
                             f"({by_variant[variant]['step']:.3f} s vs {trl['step']:.3f} s); {_saved_or_added(rest)} "
                             "its step without generation (generation is the same work for every distillation "
                             "variant).")
    reference, ace = by_variant.get(GRPO_WITH_REFERENCE), by_variant.get("ace")
    if reference and ace:
        lines.append(f"- ace: {ace['step'] / reference['step']:.2f}x the step of TRL's GRPO with a reference model "
                     f"({ace['step']:.3f} s vs {reference['step']:.3f} s), "
                     f"{_without_generation(ace) / _without_generation(reference):.2f}x its step without generation.")
    full = by_variant.get("tip-entropy_sample-1.0")
    for variant in ("tip-entropy_sample-0.5", "tip-entropy_topk-0.5"):
        if full and variant in by_variant and full["teacher lm_head"] > 0:
            ratio = by_variant[variant]["teacher lm_head"] / full["teacher lm_head"]
            lines.append(f"- {variant}: teacher lm_head projection {ratio:.2f}x that of entropy_sample at ρ = 1 "
                         f"({by_variant[variant]['teacher lm_head']:.3f} s vs {full['teacher lm_head']:.3f} s).")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None, help="a subset to run")
    parser.add_argument("--steps", type=int, default=3, help="measured steps after the warm-up (median reported)")
    parser.add_argument("--write", default=None, help="markdown file whose step-profile section is (re)written")
    parser.add_argument("--save", default=None, help="JSON file the measured rows are written to")
    parser.add_argument("--load", default=None, help="render rows saved by --save instead of measuring")
    parser.add_argument("--use_vllm", action="store_true",
                        help="also run the built-in shape with vLLM generation (colocated) and compare")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=list(SHAPES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.shape, args.steps, args.use_vllm)))
        return

    import torch

    args.cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if args.cuda else f"CPU ({os.cpu_count()} cores, one thread per worker)"
    print(f"Step profile on {device}, torch {torch.__version__}")
    if args.load:
        rows = json.loads(Path(args.load).read_text())
        args.shapes = [shape for shape in args.shapes if any(row["shape"] == shape for row in rows)]
    else:
        rows = run_all(args)
    if args.save:
        Path(args.save).write_text(json.dumps(rows, indent=1))
    clock = "CUDA-event time" if args.cuda else "CPU time"
    sections = []
    for shape in args.shapes:
        text = table(rows, shape)
        notes = savings(rows, shape)
        print(f"\n{shape} ({clock}, median of {args.steps} steps after a warm-up)\n{text}\n{notes}")
        sections.append(f"### {shape}\n\n{text}\n\n{notes}\n")
    vllm_shapes = [shape for shape in args.shapes if any(row.get("generation") == "vllm" and row["shape"] == shape
                                                         for row in rows)]
    vllm_sections = []
    for shape in vllm_shapes:
        text = generation_table(rows, shape)
        full = table(rows, shape, generation="vllm")
        print(f"\n{shape}, transformers vs vLLM generation ({clock})\n{text}\n\n{full}")
        vllm_sections.append(f"### {shape}: transformers vs vLLM generation\n\n{text}\n\nThe vLLM runs, phase by "
                             f"phase:\n\n{full}\n")
    if args.write and vllm_shapes:
        import vllm

        command = "python " + " ".join(sys.argv)
        body = (f"## Step profile with vLLM generation ({device})\n\nMeasured {time.strftime('%Y-%m-%d')} with "
                f"`{command}` ({platform.python_version()}, torch {torch.__version__}, vLLM {vllm.__version__}); "
                f"{clock}, median of {args.steps} steps after a warm-up. Each variant ran twice in this run, "
                "generating with transformers' `generate` and with vLLM colocated in the training process (float32, "
                "eager; its weight push before each generation is counted in `generation`; the engine's start is "
                "not part of a step).\n\n" + "\n".join(vllm_sections))
        write_section(args.write, "step-profile-vllm", body)
        return
    if args.write:
        command = "python " + " ".join(sys.argv)
        body = (f"## Step profile ({device})\n\nMeasured {time.strftime('%Y-%m-%d')} with `{command}` "
                f"({platform.python_version()}, torch {torch.__version__}); {clock}, median of {args.steps} steps "
                "after a warm-up; phases are exclusive and add up to the step (see the script's docstring). "
                "Baselines: TRL's `DistillationTrainer` for the distillation trainers; for ACE (at beta = 0), TRL's "
                "`GRPOTrainer` with a reference model (`beta=0.04`), which scores the completions under the same "
                "frozen reference ACE needs; `trl-grpo` is TRL's GRPO at beta = 0.\n\n" + "\n".join(sections))
        write_section(args.write, "step-profile", body)


if __name__ == "__main__":
    main()
