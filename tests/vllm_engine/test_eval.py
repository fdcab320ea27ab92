"""
`trl-tip eval --backend vllm` against `--backend transformers` on one model: the same greedy completions in float32,
and pass@1 within sampling noise.

The model is the tiny student trained here for a few seconds to answer "Answer: 7" with probability 0.7 and
"Answer: 8" with probability 0.3 whatever the problem, so that half the problems (gold 7) are solved with
probability 0.7 and the other half (gold 8) with 0.3: pass@1 is near 0.5, where sampling noise is largest.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from trl_tip.cli import main as trl_tip_main
from trl_tip.tiny_models import build_tokenizer, save_pretrained_pair, tiny_model


pytestmark = pytest.mark.vllm

NUM_PROBLEMS = 64
NUM_SAMPLES = 8
# Two-sided failure probability of the pass@1 comparison when both backends sample the same model.
FAILURE_PROBABILITY = 1e-4


def _problems():
    return [{"problem": f"{a}+{a + 1}", "answer": "7" if a % 2 else "8"} for a in range(10, 10 + NUM_PROBLEMS)]


@pytest.fixture(scope="module")
def answering_student(tmp_path_factory):
    directory = tmp_path_factory.mktemp("answering-student")
    tokenizer = build_tokenizer()
    model = tiny_model("student", seed=0, tokenizer=tokenizer)
    # The answer does not depend on the problem, so a few prompts teach it.
    rows = []
    for problem in _problems()[:8]:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": problem["problem"]}], add_generation_prompt=True, tokenize=False
        )
        for digit in "7777777888":  # P(7) = 0.7 minimises the cross-entropy
            rows.append((prompt, f"Answer: {digit}<|im_end|>"))
    encoded = [tokenizer(prompt + answer, add_special_tokens=False)["input_ids"] for prompt, answer in rows]
    prompt_lengths = [len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) for prompt, _ in rows]
    width = max(map(len, encoded))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (ids, start) in enumerate(zip(encoded, prompt_lengths, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, start : len(ids)] = torch.tensor(ids[start:])  # the loss is on the answer only
    attention_mask = torch.arange(width) < torch.tensor([len(ids) for ids in encoded])[:, None]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model_path = save_pretrained_pair(model, tokenizer, directory / "model")
    data = directory / "data"
    data.mkdir()
    with open(data / "test.jsonl", "w") as file:
        for problem in _problems():
            file.write(json.dumps(problem) + "\n")
    return {"model": model_path, "dataset": str(data)}


def _eval_arguments(student, output_dir, backend, *sampling):
    return [
        "eval", "--model", student["model"], "--dataset", student["dataset"], "--prompt_template", "{problem}",
        "--max_new_tokens", "12", "--dtype", "float32", "--backend", backend, "--output_dir", str(output_dir),
        *sampling,
    ]  # fmt: skip


def run_eval(student, output_dir, backend, *sampling):
    """`trl-tip eval`: vLLM in a process of its own, as a user runs it; transformers in this one."""
    arguments = _eval_arguments(student, output_dir, backend, *sampling)
    if backend == "vllm":
        command = [sys.executable, "-m", "trl_tip.cli", *arguments, "--enforce_eager"]
        finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-8000:]
    else:
        assert trl_tip_main(arguments) == 0
    summary = json.loads((output_dir / "summary.json").read_text())
    (records_path,) = [path for path in output_dir.glob("*.jsonl")]
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    return summary, records


def test_greedy_is_identical_in_float32(answering_student, tmp_path):
    vllm_summary, vllm_records = run_eval(answering_student, tmp_path / "vllm", "vllm", "--greedy")
    hf_summary, hf_records = run_eval(answering_student, tmp_path / "transformers", "transformers", "--greedy")
    assert vllm_summary["model_dtype"] == hf_summary["model_dtype"] == "float32"
    assert [r["completions"] for r in vllm_records] == [r["completions"] for r in hf_records]
    (vllm_result,), (hf_result,) = vllm_summary["results"].values(), hf_summary["results"].values()
    # The greedy answer is 7 for every problem: the half whose gold is 7 is solved, by both.
    assert vllm_result["mean_accuracy"] == hf_result["mean_accuracy"] == 0.5


def test_pass_at_1_agrees_within_sampling_noise(answering_student, tmp_path):
    sampling = ("--n", str(NUM_SAMPLES), "--temperature", "1.0", "--top_p", "1.0", "--seed", "0")
    vllm_summary, _ = run_eval(answering_student, tmp_path / "vllm", "vllm", *sampling)
    hf_summary, _ = run_eval(answering_student, tmp_path / "transformers", "transformers", *sampling)
    (vllm_result,), (hf_result,) = vllm_summary["results"].values(), hf_summary["results"].values()
    # pass@1 is the mean of NUM_PROBLEMS × NUM_SAMPLES independent 0/1 grades on each side. If both backends sample
    # the same distribution, the difference of the two means is a mean of m = NUM_PROBLEMS × NUM_SAMPLES terms in
    # [-1, 1] with expectation 0, so by Hoeffding P(|difference| >= t) <= 2 exp(-m t² / 2).
    m = NUM_PROBLEMS * NUM_SAMPLES
    tolerance = math.sqrt(2 * math.log(2 / FAILURE_PROBABILITY) / m)
    difference = vllm_result["pass_at_k"]["1"] - hf_result["pass_at_k"]["1"]
    assert abs(difference) < tolerance, (vllm_result["pass_at_k"]["1"], hf_result["pass_at_k"]["1"], tolerance)
    # Both sample the trained mixture, not a degenerate one: pass@1 near 0.5, far from a greedy 0/1 per problem.
    assert 0.3 < hf_result["pass_at_k"]["1"] < 0.7
