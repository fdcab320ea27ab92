"""
Step time and peak memory of TIP token selection against TRL, on the same batch and models, in one run.

Variants, each timed on one distillation training step (loss forward + backward through student backbone and
`lm_head`; generation and the optimiser step are identical for all and left out):

- `trl`: `trl.DistillationTrainer` (chunked divergence, every completion token) — the baseline of every ratio;
- `tip-1.0`, `tip-0.5`, `tip-0.2`: `TipDistillTrainer`, soft-OR selection at ρ = 1.0, 0.5, 0.2;
- `gkd-full-logits`: full `(tokens × V)` logits for both models and TRL's experimental GKD loss
  (`GKDTrainer.generalized_jsd_loss`), the path that materialises the logits.

Each variant runs in its own process (so peak memory is its own), after one warm-up step. On CUDA, time is wall time
after synchronisation and peak memory is `torch.cuda.max_memory_allocated`. On CPU, each worker runs on one thread and
time is the process's CPU time (work done, much less sensitive than wall time to other load on a shared machine; wall
time is printed too); peak memory is the rise of the process's peak resident memory (VmHWM) over the step, with glibc
told to return large blocks to the system (MALLOC_MMAP_THRESHOLD_) so that freed memory is not reused unseen.

    python benchmarks/token_selection.py                      # both vocabularies, table on stdout
    python benchmarks/token_selection.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RETURN_LARGE_BLOCKS,
    command_line,
    describe_versions,
    device_name,
    reset_peak_rss,
    run_worker_process,
    status_kib,
    worker_env,
    write_section,
)


VARIANTS = ("trl", "tip-1.0", "tip-0.5", "tip-0.2", "gkd-full-logits")


def run_worker(variant: str, args) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import DistillationConfig, DistillationTrainer

    from trl_tip import TipDistillConfig, TipDistillTrainer

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def model(hidden, layers, seed):
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=args.vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=args.prompt_length + args.completion_length + 8,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
        )
        return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)

    # lm_head-heavy shapes: the vocabulary projection dominates the backbone.
    student = model(args.student_hidden, args.student_layers, 1)
    teacher = model(args.teacher_hidden, args.teacher_layers, 2).eval()

    generator = torch.Generator().manual_seed(3)
    batch, prompt_length, completion_length = args.batch, args.prompt_length, args.completion_length
    prompt_ids = torch.randint(2, args.vocab, (batch, prompt_length), generator=generator)
    completion_ids = torch.randint(2, args.vocab, (batch, completion_length), generator=generator)
    # Ragged completions: rollout i ends after a different number of tokens, as generated ones do.
    lengths = torch.linspace(completion_length // 2, completion_length, batch).long()
    completion_mask = (torch.arange(completion_length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    inputs = {
        "prompt_ids": prompt_ids.to(device),
        "prompt_mask": torch.ones_like(prompt_ids).to(device),
        "completion_ids": completion_ids.to(device),
        "completion_mask": completion_mask.to(device),
    }

    common = {
        "output_dir": "/tmp/trl_tip_benchmark",
        "report_to": "none",
        "bf16": device.type == "cuda",
        "per_device_train_batch_size": batch,
        "gradient_checkpointing": False,
        "use_cpu": device.type == "cpu",
    }
    if variant == "gkd-full-logits":
        from trl.experimental.gkd import GKDTrainer

        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        labels = torch.cat([torch.full_like(inputs["prompt_ids"], -100),
                            inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0, -100)], dim=1)

        def step():
            student_logits = student(input_ids=input_ids, attention_mask=attention_mask).logits[:, prompt_length - 1 : -1]
            with torch.no_grad():
                teacher_logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[
                    :, prompt_length - 1 : -1
                ]
            loss = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels[:, prompt_length:], beta=1.0)
            loss.backward()
            return loss

        trained = student
    else:
        if variant == "trl":
            trainer = DistillationTrainer(
                model=student, teacher_model=teacher, args=DistillationConfig(**common),
                processing_class=_tokenizer(),
            )
        else:
            ratio = float(variant.split("-")[1])
            config = TipDistillConfig(token_selection="soft_or", token_ratio=ratio, **common)
            trainer = TipDistillTrainer(model=student, teacher_model=teacher, args=config,
                                        processing_class=_tokenizer())
        trained = trainer.model
        trained.train()

        def step():
            loss = trainer.compute_loss(trained, inputs)
            loss.backward()
            return loss

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    loss = step()  # warm-up
    trained.zero_grad(set_to_none=True)
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = status_kib("VmRSS") * 1024
    times, wall_times = [], []
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    for repeat in range(args.repeats):
        start, wall_start = clock(), time.perf_counter()
        loss = step()
        synchronize()
        times.append(clock() - start)
        wall_times.append(time.perf_counter() - wall_start)
        trained.zero_grad(set_to_none=True)
        if repeat == 0:
            peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else status_kib("VmHWM") * 1024) - base
    return {"variant": variant, "seconds": statistics.median(times), "wall_seconds": statistics.median(wall_times),
            "peak_bytes": max(peak, 0),
            "loss": float(loss.detach().float())}


def _tokenizer():
    from trl_tip.tiny_models import build_tokenizer

    return build_tokenizer()


def run_all(args) -> list[dict]:
    rows = []
    for vocab in args.vocabs:
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--worker", variant, "--vocab", str(vocab), "--repeats",
                       str(args.repeats), "--batch", str(args.batch), "--prompt-length", str(args.prompt_length),
                       "--completion-length", str(args.completion_length), "--student-hidden", str(args.student_hidden),
                       "--student-layers", str(args.student_layers), "--teacher-hidden", str(args.teacher_hidden),
                       "--teacher-layers", str(args.teacher_layers)]
            env = worker_env(**RETURN_LARGE_BLOCKS, **({} if args.cuda else {"OMP_NUM_THREADS": "1"}))
            row = run_worker_process(command, f"{variant} (V={vocab})", env)
            row["vocab"] = vocab
            rows.append(row)
            print(f"  V={vocab:>7} {variant:<16} {row['seconds']:.3f} s (wall {row['wall_seconds']:.3f} s) "
                  f"{row['peak_bytes'] / 2**20:9.1f} MiB", flush=True)
    return rows


def table(rows, args) -> str:
    lines = [
        f"| vocabulary | variant | step {'time' if args.cuda else 'CPU time'} (s) | time vs TRL | peak memory (MiB) "
        "| memory vs TRL |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for vocab in args.vocabs:
        baseline = next(r for r in rows if r["vocab"] == vocab and r["variant"] == "trl")
        for row in (r for r in rows if r["vocab"] == vocab):
            lines.append(
                f"| {vocab:,} | {row['variant']} | {row['seconds']:.3f} | {row['seconds'] / baseline['seconds']:.2f}x "
                f"| {row['peak_bytes'] / 2**20:.1f} | {row['peak_bytes'] / max(baseline['peak_bytes'], 1):.2f}x |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32_000, 151_936])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--completion-length", type=int, default=128)
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--student-layers", type=int, default=1)
    parser.add_argument("--teacher-hidden", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", default=None, help="markdown file whose token-selection section is (re)written")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args)))
        return

    import torch

    args.cuda = torch.cuda.is_available()
    device = device_name(args.cuda)
    print(f"Token-selection benchmark on {device}, torch {torch.__version__}")
    rows = run_all(args)
    shape = (f"batch {args.batch} × (prompt {args.prompt_length} + completion ≤ {args.completion_length}) tokens; "
             f"student Qwen2 hidden {args.student_hidden} × {args.student_layers} layer(s), teacher hidden "
             f"{args.teacher_hidden} × {args.teacher_layers} layers; "
             f"{'bf16' if args.cuda else 'fp32'}; median of {args.repeats} steps after a warm-up")
    result = table(rows, args)
    print()
    print(shape)
    print(result)
    if args.write:
        section = (
            f"## Token selection ({device})\n\n"
            f"Measured {time.strftime('%Y-%m-%d')} with `{command_line()}` ({describe_versions()}).\n{shape}.\n\n"
            f"{result}\n"
        )
        write_section(args.write, "token-selection", section)


if __name__ == "__main__":
    main()
