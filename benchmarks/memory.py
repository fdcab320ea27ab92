"""
Peak memory of a TIP distillation training step under three precision set-ups, same shapes, in one run:

- `bf16 student + bf16 teacher` (full fine-tuning);
- `QLoRA student + 4-bit teacher` (nf4 base + LoRA adapters; teacher loaded with `teacher_quantization="4bit"`);
- `QLoRA student + bf16 teacher`.

Each set-up runs in its own process: it loads the student and the teacher from disk the way users do (by path,
through the trainer), then trains one step (generation, loss, backward, optimiser step). Reported: the peak over
loading and the step, relative to the process before loading (weights, optimiser state and activations together).
On CUDA this is `torch.cuda.max_memory_allocated`; on CPU, the peak resident memory (VmHWM) with glibc returning
large blocks to the system. (On CPU, safetensors weights are memory-mapped and only become resident when first
read, so the memory "after loading" says little there; the peak over the step includes them.)

    python benchmarks/memory.py
    python benchmarks/memory.py --write docs/benchmarks.md

With `--served` (run with the vLLM environment's Python, which `trl vllm-serve` and TRL's client need), the same pair
is trained in bf16 with the teacher loaded in the training process, then with the teacher served by a
`trl vllm-serve` this script starts (float32, on this machine), and the training process's peak is compared. The
numbers are written to `benchmarks/results/memory_served.json` and rendered from there (`--load` renders saved ones):

    .venv-vllm/bin/python benchmarks/memory.py --served --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RETURN_LARGE_BLOCKS,
    command_line,
    describe_versions,
    device_name,
    load_json,
    run_worker_process,
    save_json,
    status_kib,
    versions,
    worker_env,
    write_section,
)


SETUPS = {
    "bf16 student + bf16 teacher": {"student": "bf16", "teacher": "none"},
    "QLoRA student + 4-bit teacher": {"student": "qlora", "teacher": "4bit"},
    "QLoRA student + bf16 teacher": {"student": "qlora", "teacher": "none"},
    "bf16 student + served teacher": {"student": "bf16", "teacher": "served"},
}
# `--served`: the teacher in the training process against the teacher in a server, the student the same.
SERVED_SETUPS = ("bf16 student + bf16 teacher", "bf16 student + served teacher")
SERVED_RESULTS = Path(__file__).resolve().parent / "results" / "memory_served.json"
SERVED_TOP_K = 8


def save_models(directory: str, args) -> dict[str, str]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from trl_tip.tiny_models import build_tokenizer, save_pretrained_pair

    tokenizer = build_tokenizer()
    paths = {}
    for role, hidden, layers in (("student", args.student_hidden, args.student_layers),
                                 ("teacher", args.teacher_hidden, args.teacher_layers)):
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                             num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                             max_position_embeddings=256, tie_word_embeddings=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        paths[role] = save_pretrained_pair(model, tokenizer, os.path.join(directory, role))
    return paths


def run_worker(setup: str, paths: dict[str, str]) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from trl_tip import TipDistillConfig, TipDistillTrainer
    from trl_tip.tasks import build_arithmetic_dataset

    cuda = torch.cuda.is_available()
    dataset = build_arithmetic_dataset()["train"].select(range(4))
    choice = SETUPS[setup]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = status_kib("VmRSS") * 1024
    kwargs = {}
    if choice["student"] == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["peft_config"] = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    served = choice["teacher"] == "served"
    teacher_settings = (
        {"teacher_model_server_url": paths["server"], "loss_top_k": SERVED_TOP_K}
        if served
        else {"teacher_quantization": choice["teacher"], "teacher_model_init_kwargs": {"dtype": "bfloat16"}}
    )
    config = TipDistillConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-5,
        max_completion_length=32, report_to="none", save_strategy="no", bf16=cuda, use_cpu=not cuda,
        model_init_kwargs={"dtype": "bfloat16"}, token_selection="soft_or", token_ratio=0.5, **teacher_settings,
    )
    started = time.perf_counter()
    trainer = TipDistillTrainer(model=paths["student"], teacher_model=None if served else paths["teacher"],
                                args=config, train_dataset=dataset, **kwargs)
    trainer.train()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else status_kib("VmHWM") * 1024
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"setup": setup, "peak_bytes": peak - base, "seconds": seconds, "trainable": trainable}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student-hidden", type=int, default=1024)
    parser.add_argument("--student-layers", type=int, default=8)
    parser.add_argument("--teacher-hidden", type=int, default=1536)
    parser.add_argument("--teacher-layers", type=int, default=12)
    parser.add_argument("--write", default=None, help="markdown file whose memory section is (re)written")
    parser.add_argument("--served", action="store_true",
                        help="compare a teacher in the training process with one served by `trl vllm-serve`")
    parser.add_argument("--load", default=None, help="with --served: render results saved earlier")
    parser.add_argument("--worker", choices=sorted(SETUPS), help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args.worker, json.loads(args.paths))))
        return

    if args.served:
        results = load_json(args.load) if args.load else measure_served(args)
        if not args.load:
            save_json(SERVED_RESULTS, results)
        print(served_table(results))
        if args.write:
            write_section(args.write, "memory-served", served_section(results))
        return

    import torch

    device = device_name(torch.cuda.is_available(), cpu_note=None)
    print(f"Memory benchmark on {device}, torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        paths = save_models(directory, args)
        for setup in (name for name, choice in SETUPS.items() if choice["teacher"] != "served"):
            row = run_worker_process([sys.executable, __file__, "--worker", setup, "--paths", json.dumps(paths)],
                                     setup, worker_env(**RETURN_LARGE_BLOCKS))
            rows.append(row)
            print(f"  {setup:<32} {row['peak_bytes'] / 2**20:9.1f} MiB  ({row['seconds']:.0f} s)", flush=True)
    baseline = rows[0]["peak_bytes"]
    shape = (f"student Qwen2 hidden {args.student_hidden} × {args.student_layers} layers, teacher hidden "
             f"{args.teacher_hidden} × {args.teacher_layers} layers, vocabulary 259; one TIP step (soft-OR 50 %) of "
             "4 prompts × ≤ 32 completion tokens, AdamW; LoRA r=16 on all linear layers")
    lines = ["| set-up | peak memory (MiB) | vs bf16 + bf16 | trainable parameters |", "|---|---:|---:|---:|"]
    lines += [f"| {r['setup']} | {r['peak_bytes'] / 2**20:.1f} | {r['peak_bytes'] / baseline:.2f}x | {r['trainable']:,} |"
              for r in rows]
    table = "\n".join(lines)
    print()
    print(shape)
    print(table)
    if args.write:
        write_section(args.write, "memory", (
            f"## Memory: QLoRA students and quantised teachers ({device})\n\n"
            f"Measured {time.strftime('%Y-%m-%d')} with `{command_line()}` ({describe_versions(python=False)}).\n"
            f"{shape}.\n\n{table}\n"
        ))


@contextlib.contextmanager
def teacher_server(path: str, log_path: str):
    """`trl vllm-serve --model path` (float32, eager) on a free local port until the context ends: yields its URL."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [str(Path(sys.executable).with_name("trl")), "vllm-serve", "--model", path, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce_eager", "--max_model_len", "256"]
    env = worker_env(VLLM_CPU_KVCACHE_SPACE="1")
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"trl vllm-serve did not come up:\n{Path(log_path).read_text()[-4000:]}")
                time.sleep(1)
            yield url
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def measure_served(args) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        paths = save_models(directory, args)
        with teacher_server(paths["teacher"], os.path.join(directory, "vllm-serve.log")) as url:
            paths["server"] = url
            for setup in SERVED_SETUPS:
                row = run_worker_process([sys.executable, __file__, "--worker", setup, "--paths", json.dumps(paths)],
                                         setup, worker_env(pythonpath=True, **RETURN_LARGE_BLOCKS))
                rows.append(row)
                print(f"  {setup:<32} {row['peak_bytes'] / 2**20:9.1f} MiB  ({row['seconds']:.0f} s)", flush=True)
    import torch

    return {
        "measured": time.strftime("%Y-%m-%d"),
        "command": command_line(),
        "device": device_name(torch.cuda.is_available(), cpu_note=None),
        "versions": versions(vllm=True),
        "shape": {"student_hidden": args.student_hidden, "student_layers": args.student_layers,
                  "teacher_hidden": args.teacher_hidden, "teacher_layers": args.teacher_layers, "vocabulary": 259,
                  "prompts": 4, "max_completion_length": 32, "loss_top_k": SERVED_TOP_K},
        "rows": rows,
    }


def served_table(results: dict) -> str:
    rows = results["rows"]
    local = next(row for row in rows if "served" not in row["setup"])
    lines = ["| teacher | training process peak memory (MiB) | vs teacher in the process |", "|---|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['setup'].split(' + ', 1)[1]} | {row['peak_bytes'] / 2**20:.1f} | "
                     f"{row['peak_bytes'] / local['peak_bytes']:.2f}x |")
    return "\n".join(lines)


def served_section(results: dict) -> str:
    shape, versions_used = results["shape"], results["versions"]
    rows = {row["setup"]: row for row in results["rows"]}
    saved = (rows[SERVED_SETUPS[0]]["peak_bytes"] - rows[SERVED_SETUPS[1]]["peak_bytes"]) / 2**20
    return (
        "## Memory: a served teacher\n\n"
        f"Measured {results['measured']} on {results['device']} with `{results['command']}` (torch "
        f"{versions_used['torch']}, vLLM "
        f"{versions_used['vllm']}). Student Qwen2 hidden {shape['student_hidden']} × {shape['student_layers']} layers "
        f"(bf16), teacher hidden {shape['teacher_hidden']} × {shape['teacher_layers']} layers, vocabulary "
        f"{shape['vocabulary']}; one TIP step (soft-OR 50 %) of {shape['prompts']} prompts × ≤ "
        f"{shape['max_completion_length']} completion tokens, AdamW. The teacher is either loaded in the training "
        f"process (bf16) or served by `trl vllm-serve` on the same machine (`loss_top_k={shape['loss_top_k']}`); the "
        "peak resident memory of the training process is reported (the server's own memory is not in it). Data: "
        f"`benchmarks/results/memory_served.json`.\n\n{served_table(results)}\n\n"
        f"The served teacher saves {saved:.0f} MiB of the training process's peak.\n"
    )


if __name__ == "__main__":
    main()
