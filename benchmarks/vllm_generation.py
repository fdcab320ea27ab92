"""
Rollout throughput of vLLM against transformers' `generate`, on the lab task's models, measured in the same run.

Each backend samples one completion (temperature 1, at most 128 tokens, the lab's budget) for each of `--prompts`
training prompts of the lab, from the lab's student and from its teacher, in float32, in a process of its own with
one torch thread. Reported per model and backend: the seconds to sample them (median of `--repeats` calls after a
warm-up call), completion tokens per second, and the ratio to transformers; for vLLM also the engine's start (loading,
KV-cache allocation, and, unless eager, compilation). vLLM runs in eager mode (as trl_tip's CPU path and
`trl-tip eval --enforce_eager` do) and compiled (vLLM's default).

    python benchmarks/vllm_generation.py --write docs/scale.md    # needs vLLM: `make test-vllm` builds .venv-vllm
    python benchmarks/vllm_generation.py --load benchmarks/results/vllm_generation.json --write docs/scale.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import (  # noqa: E402
    command_line,
    load_json,
    run_worker_process,
    save_json,
    versions,
    worker_env,
    write_section,
)


RESULTS = ROOT / "benchmarks" / "results" / "vllm_generation.json"
BACKENDS = ("transformers", "vllm-eager", "vllm-compiled")
BATCH_SIZE = 64  # transformers: prompts per `generate` call (a trainer's generation batch on CPU)


def _prompt_ids(tokenizer, count: int) -> list[list[int]]:
    from trl_tip.tasks.lab import build_lab_dataset

    prompts = list(build_lab_dataset()["train"]["prompt"][:count])
    encoded = tokenizer.apply_chat_template(prompts, add_generation_prompt=True)
    return [list(ids) for ids in (encoded["input_ids"] if hasattr(encoded, "keys") else encoded)]


def run_worker(backend: str, model_path: str, count: int, repeats: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from trl_tip.tasks.lab import LAB_MAX_COMPLETION_TOKENS

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    prompt_ids = _prompt_ids(tokenizer, count)
    started = time.perf_counter()
    if backend == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

        @torch.no_grad()
        def sample(seed: int) -> int:
            torch.manual_seed(seed)
            tokens = 0
            for start in range(0, len(prompt_ids), BATCH_SIZE):
                batch = tokenizer.pad({"input_ids": prompt_ids[start : start + BATCH_SIZE]}, return_tensors="pt")
                output = model.generate(**batch, max_new_tokens=LAB_MAX_COMPLETION_TOKENS, do_sample=True,
                                        temperature=1.0, top_p=None, top_k=None,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                completions = output[:, batch["input_ids"].shape[1] :]
                # Tokens up to and including the end of turn (the rest is padding after it).
                ended = (completions == tokenizer.eos_token_id).int().cumsum(-1)
                tokens += int(((ended == 0) | ((ended == 1) & (completions == tokenizer.eos_token_id))).sum())
            return tokens
    else:
        from vllm import LLM, SamplingParams

        from trl_tip.vllm_cpu import ensure_cpu_kv_cache_space

        ensure_cpu_kv_cache_space()
        llm = LLM(model=model_path, dtype="float32", enforce_eager=backend == "vllm-eager", seed=0,
                  max_model_len=1024)

        def sample(seed: int) -> int:
            params = SamplingParams(temperature=1.0, max_tokens=LAB_MAX_COMPLETION_TOKENS)
            outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
            return sum(len(output.outputs[0].token_ids) for output in outputs)

    start_seconds = time.perf_counter() - started
    sample(0)  # warm-up
    timings, tokens = [], []
    for repeat in range(repeats):
        began = time.perf_counter()
        tokens.append(sample(1 + repeat))
        timings.append(time.perf_counter() - began)
    return {"backend": backend, "start_seconds": start_seconds, "seconds": statistics.median(timings),
            "tokens": statistics.median(tokens), "completions": len(prompt_ids)}


def run_all(args) -> dict:
    from trl_tip.tasks import prepare_lab_models

    prepared = prepare_lab_models(cache_dir=args.cache_dir, verbose=False)
    rows = []
    for role in ("student", "teacher"):
        for backend in BACKENDS:
            command = [sys.executable, __file__, "--worker", backend, "--model", prepared[role],
                       "--prompts", str(args.prompts), "--repeats", str(args.repeats)]
            env = worker_env(pythonpath=True, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
            row = {"model": role, **run_worker_process(command, f"{backend} on the {role}", env, cwd=ROOT,
                                                       stderr_tail=4000)}
            rows.append(row)
            print(f"  {role:<8} {backend:<14} {row['seconds']:.2f} s  {row['tokens'] / row['seconds']:.0f} tokens/s  "
                  f"(start {row['start_seconds']:.1f} s)", flush=True)
    return {
        "measured": time.strftime("%Y-%m-%d"),
        "command": command_line(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, one torch thread per backend",
        "versions": versions(vllm=True),
        "prompts": args.prompts,
        "repeats": args.repeats,
        "rows": rows,
    }


def table(results: dict) -> str:
    lines = [
        "| model | backend | sampling (s) | completion tokens/s | vs transformers | engine start (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for role in ("student", "teacher"):
        rows = [row for row in results["rows"] if row["model"] == role]
        base = next(row for row in rows if row["backend"] == "transformers")
        base_rate = base["tokens"] / base["seconds"]
        for row in rows:
            rate = row["tokens"] / row["seconds"]
            start = "—" if row["backend"] == "transformers" else f"{row['start_seconds']:.1f}"
            lines.append(f"| {role} | {row['backend']} | {row['seconds']:.2f} | {rate:,.0f} | {rate / base_rate:.1f}x "
                         f"| {start} |")
    return "\n".join(lines)


def section(results: dict) -> str:
    versions = results["versions"]
    return (
        f"Measured {results['measured']} with `{results['command']}` on {results['machine']} (Python "
        f"{versions['python']}, torch {versions['torch']}, vLLM {versions['vllm']}): {results['prompts']} lab "
        f"training prompts, one completion each at temperature 1 (≤ 128 tokens), float32; median of "
        f"{results['repeats']} calls after a warm-up. Data: `benchmarks/results/vllm_generation.json`.\n\n" + table(results) + "\n"
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache_dir", default=None, help="where the lab's models are prepared (default: the cache)")
    parser.add_argument("--write", default=None, help="markdown file whose vllm-generation section is (re)written")
    parser.add_argument("--load", default=None, help="render results saved earlier instead of measuring")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser


def main():
    args = make_parser().parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.model, args.prompts, args.repeats)))
        return
    if args.load:
        results = load_json(args.load)
    else:
        results = run_all(args)
        save_json(RESULTS, results)
    print(table(results))
    if args.write:
        write_section(args.write, "vllm-generation", section(results))


if __name__ == "__main__":
    main()
