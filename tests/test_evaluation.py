import json
import logging
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import trl_tip.cli as cli
import trl_tip.evaluation as evaluation
from trl_tip import evaluate_pass_at_k, grade_answer, pass_at_k
from trl_tip.evaluation import BENCHMARKS, grade_problems, load_benchmark, summarize
from trl_tip.tasks.arithmetic import generate_completions
from trl_tip.tiny_models import build_tokenizer
from builders import training_config


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 1, 0.25),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (10, 3, 4, 1 - 35 / 210),  # C(7,4) = 35, C(10,4) = 210
        (8, 0, 8, 0.0),
        (8, 8, 1, 1.0),
        (6, 4, 3, 1.0),  # n - c < k: every draw of 3 contains a correct sample
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_1_is_the_fraction_correct_and_large_n_is_stable():
    assert all(pass_at_k(16, c, 1) == pytest.approx(c / 16) for c in range(17))
    # Large binomials do not overflow: 1 - (1 - 1/1000)^... is computed exactly from integers.
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)
    assert 0.0 < pass_at_k(1000, 1, 1) < pass_at_k(1000, 1, 2) < 1.0


@pytest.mark.parametrize(
    "n, c, k, error, message",
    [
        (0, 0, 1, ValueError, "n >= 1"),
        (4, 5, 1, ValueError, "0 <= c <= n"),
        (4, -1, 1, ValueError, "0 <= c <= n"),
        (4, 1, 0, ValueError, "1 <= k <= n"),
        (4, 1, 5, ValueError, "1 <= k <= n"),
        (4.0, 1, 1, TypeError, "integer n"),
        (4, True, 1, TypeError, "integer c"),
    ],
)
def test_pass_at_k_rejects_bad_arguments(n, c, k, error, message):
    with pytest.raises(error, match=message):
        pass_at_k(n, c, k)


def test_evaluate_pass_at_k_aggregates_graded_samples(monkeypatch):
    dataset = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": "1+1"}], [{"role": "user", "content": "2+2"}]], "answer": ["2", "4"]}
    )
    # Problem 1: one correct sample of four; problem 2: three of four (one without an answer at all).
    scripted = ["\\boxed{2}", "\\boxed{3}", "\\boxed{5}", "no answer", "\\boxed{4}", "\\boxed{4}", "Answer: 4", "x"]
    counts = [3, 5, 7, 9, 11, 13, 15, 17]
    calls = []

    def fake_sample(model, tokenizer, prompt_ids, num_samples, max_new_tokens, temperature, top_p, top_k, batch_size):
        calls.append({"prompt_ids": prompt_ids, "n": num_samples, "temperature": temperature, "max": max_new_tokens,
                      "top_p": top_p, "top_k": top_k})
        return scripted, counts

    monkeypatch.setattr(evaluation, "sample_completions", fake_sample)
    model = SimpleNamespace(device=torch.device("cpu"))  # only its device is read
    tokenizer = build_tokenizer()
    result, problems = evaluate_pass_at_k(
        model, tokenizer, dataset, num_samples=4, max_new_tokens=16, temperature=0.7, return_problems=True
    )

    expected_ids = [
        tokenizer.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"] for prompt in dataset["prompt"]
    ]
    assert calls == [{"prompt_ids": expected_ids, "n": 4, "temperature": 0.7, "max": 16, "top_p": 1.0, "top_k": 0}]
    assert result["mean_accuracy"] == pytest.approx(0.5)
    expected = {1: (0.25 + 0.75) / 2, 2: (0.5 + 1.0) / 2, 3: (0.75 + 1.0) / 2, 4: 1.0}
    assert result["pass_at_k"] == pytest.approx(expected)
    assert result["mean_completion_tokens"] == pytest.approx(10.0)  # the generated counts, as given
    assert (result["num_problems"], result["num_samples"], result["num_ungradable"]) == (2, 4, 0)

    assert [p["index"] for p in problems] == [0, 1]
    assert problems[0]["prompt"] == dataset[0]["prompt"] and problems[1]["answer"] == "4"
    assert problems[0]["scores"] == [1.0, 0.0, 0.0, 0.0] and problems[1]["scores"] == [1.0, 1.0, 1.0, 0.0]
    assert (problems[0]["num_correct"], problems[1]["num_correct"]) == (1, 3)
    assert problems[1]["completions"] == scripted[4:] and problems[1]["completion_tokens"] == counts[4:]
    assert problems[0]["pass_at_k"] == {k: pass_at_k(4, 1, k) for k in range(1, 5)}


def test_an_unparseable_gold_answer_counts_as_wrong_and_is_reported():
    problems = grade_problems(["4", ""], ["\\boxed{4}", "\\boxed{1}", "\\boxed{1}", "x"], [1, 2, 3, 4], 2)
    assert [p["gradable"] for p in problems] == [True, False]
    # Gold answers that are not mathematical objects count as ungradable too, even when a sample repeats them.
    for gold in ("n/a", "see solution", "\\frac{", "???"):
        (problem,) = grade_problems([gold], [f"\\boxed{{{gold}}}", "\\boxed{1}"], [1, 1], 2)
        assert not problem["gradable"] and problem["scores"] == [0.0, 0.0]
    assert problems[1]["scores"] == [0.0, 0.0]
    summary = summarize(problems, 2)
    assert summary["num_ungradable"] == 1 and summary["mean_accuracy"] == pytest.approx(0.25)
    assert summary["pass_at_k"] == pytest.approx({1: 0.25, 2: 0.5})
    with pytest.raises(ValueError, match="Expected 2 × 2 completions"):
        grade_problems(["4", "5"], ["a", "b", "c"], [1, 2, 3], 2)


class _ScriptedModel:
    """Stands in for a causal LM: `generate` appends scripted completion ids to the (left-padded) prompts."""

    def __init__(self, completions, eos_token_id):
        self.completions = completions
        self.generation_config = SimpleNamespace(eos_token_id=eos_token_id)
        self.device = torch.device("cpu")
        self.training = True
        self.calls = []

    def eval(self):
        self.training = False
        return self

    def train(self, mode=True):
        self.training = mode
        return self

    def generate(self, input_ids, attention_mask, generation_config):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, "config": generation_config,
                           "training": self.training})
        rows = self.completions[: len(input_ids)]
        self.completions = self.completions[len(input_ids):]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_sample_completions_counts_tokens_up_to_the_first_end_of_sequence():
    tokenizer = build_tokenizer()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    a, b, one = ord("a"), ord("b"), ord("1")
    # Three prompts x 2 samples, generated in batches of 4 then 2; padding after the end of sequence, as generate does.
    completions = [
        [a, eos, pad, pad],  # 2 tokens, the eos included
        [a, b, one, a],  # cut at the budget: 4
        [eos, pad, pad, pad],  # 1
        [b, b, b, eos],  # 4
        [one, eos],  # second batch, 2 wide
        [eos, pad],
    ]
    model = _ScriptedModel(completions, eos_token_id=[eos, 7])
    prompt_ids = [[1, 2, 3], [4], [5, 6]]
    texts, counts = evaluation.sample_completions(
        model, tokenizer, prompt_ids, num_samples=2, max_new_tokens=4, temperature=0.5, top_p=0.9, batch_size=4
    )
    assert texts == ["a", "ab1a", "", "bbb", "1", ""]
    assert counts == [2, 4, 1, 4, 2, 1]
    first, second = model.calls
    assert first["input_ids"].tolist() == [[1, 2, 3], [1, 2, 3], [pad, pad, 4], [pad, pad, 4]]
    assert first["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 1], [0, 0, 1]]
    assert second["input_ids"].tolist() == [[5, 6], [5, 6]]
    config = first["config"]
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.5, 0.9, 0)
    assert (config.max_new_tokens, sorted(config.eos_token_id), config.pad_token_id) == (4, sorted({eos, 7}), pad)
    assert not first["training"] and model.training  # sampled in eval mode, training mode restored


# ---------------------------------------------------------------------------------------------------------------------
# Benchmarks


def _fake_hub(monkeypatch, rows):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return Dataset.from_dict(rows)

    monkeypatch.setattr(evaluation, "load_dataset", fake_load_dataset)
    return calls


@pytest.mark.parametrize(
    "name, path, split, columns",
    [
        ("math500", "HuggingFaceH4/MATH-500", "test", {"solution": ["s"], "subject": ["Algebra"], "level": [1]}),
        ("aime24", "HuggingFaceH4/aime_2024", "train", {"id": [6], "solution": ["s"], "url": ["u"], "year": ["2024"]}),
        ("aime25", "yentinglin/aime_2025", "train", {"id": [0], "solution": ["s"], "url": ["u"], "year": ["2025"]}),
    ],
)
def test_named_benchmarks_read_problem_and_answer_columns(monkeypatch, name, path, split, columns):
    calls = _fake_hub(monkeypatch, {"problem": ["Find $x$."], "answer": [204], **columns})
    dataset = load_benchmark(name)
    assert calls == [(path, None, split)]
    assert BENCHMARKS[name].path == path
    # MATH-500's `level` is kept (trl-tip eval reports accuracy per level); the other extra columns are not.
    level = {"level": columns["level"][0]} if "level" in columns else {}
    assert sorted(dataset.column_names) == sorted(["answer", "problem", "prompt", *level])
    expected = "Find $x$.\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert dataset[0] == {"prompt": [{"role": "user", "content": expected}], "answer": "204", "problem": "Find $x$.",
                          **level}


def test_hub_id_with_overrides_and_missing_columns(monkeypatch):
    calls = _fake_hub(monkeypatch, {"question": ["q1", "q2", "q3"], "solution": ["1", "2", "3"]})
    dataset = load_benchmark(
        "someone/set", num_problems=2, split="validation", problem_column="question", answer_column="solution",
        config="main", prompt_template="Q: {problem}",
    )
    assert calls == [("someone/set", "main", "validation")]
    assert dataset["prompt"] == [[{"role": "user", "content": "Q: q1"}], [{"role": "user", "content": "Q: q2"}]]
    assert dataset["answer"] == ["1", "2"]
    with pytest.raises(ValueError, match=r"has no column \['problem', 'answer'\]"):
        load_benchmark("someone/set")
    with pytest.raises(ValueError, match="Unknown benchmark 'gsm8k'"):
        load_benchmark("gsm8k")
    with pytest.raises(ValueError, match="must contain \\{problem\\}"):
        load_benchmark("math500", prompt_template="no placeholder")


def test_builtin_benchmark_is_the_task_test_split():
    from trl_tip.tasks import build_arithmetic_dataset

    dataset = load_benchmark("builtin", num_problems=5)
    test = build_arithmetic_dataset()["test"]
    assert dataset["prompt"] == test["prompt"][:5] and dataset["answer"] == test["answer"][:5]
    assert dataset["problem"] == [p[0]["content"] for p in test["prompt"][:5]]
    assert len(load_benchmark("builtin")) == 300
    with pytest.raises(ValueError, match="fixed columns"):
        load_benchmark("builtin", split="train")


def test_evaluate_pass_at_k_on_a_model_is_seeded_and_leaves_the_random_state(tiny_model_paths):
    path = tiny_model_paths["student"]
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"{a}+1"}] for a in (3, 4, 5)]})
    dataset = dataset.add_column("answer", ["4", "5", "6"])

    torch.manual_seed(123)
    first = evaluate_pass_at_k(model, tokenizer, dataset, num_samples=3, max_new_tokens=6, seed=7)
    after_first = torch.rand(1)
    torch.manual_seed(123)
    second = evaluate_pass_at_k(model, tokenizer, dataset, num_samples=3, max_new_tokens=6, seed=7)
    assert torch.equal(torch.rand(1), after_first)  # the evaluation drew nothing from the global stream
    assert first == second
    assert sorted(first["pass_at_k"]) == [1, 2, 3]
    assert all(0.0 <= value <= 1.0 for value in first["pass_at_k"].values())
    assert first["mean_completion_tokens"] >= 1
    assert math.isclose(first["pass_at_k"][1], first["mean_accuracy"])


def test_evaluate_pass_at_k_rejects_bad_input():
    tokenizer = build_tokenizer()
    model = SimpleNamespace(device=torch.device("cpu"))
    without_answers = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+1"}]]})
    with pytest.raises(ValueError, match="needs a `answer` column"):
        evaluate_pass_at_k(model, tokenizer, without_answers)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        evaluate_pass_at_k(model, tokenizer, without_answers.add_column("answer", ["2"]), num_samples=0)



# ---------------------------------------------------------------------------------------------------------------------
# `trl-tip eval`

ROOT = Path(__file__).resolve().parents[1]


def test_console_script_is_declared_and_help_works(capsys):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"trl-tip": "trl_tip.cli:main"}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0 and "eval" in capsys.readouterr().out
    # As a module, the way the console script's entry point runs it.
    result = subprocess.run([sys.executable, "-m", "trl_tip.cli", "eval", "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    for flag in ("--backend {transformers,vllm}", "--dataset", "--num_problems", "--n N", "--temperature",
                 "--max_new_tokens", "--output_dir"):
        assert flag in result.stdout
    # Nothing else: no third-party notice (bitsandbytes', on CPUs with AVX512-BF16, see trl_tip/_notices.py).
    assert result.stderr == ""


def test_only_bitsandbytes_missing_kernels_notice_is_filtered(caplog):
    import trl_tip  # noqa: F401 (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    message = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already ..."
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning(message, ModuleNotFoundError("No module named 'kernels'"))
        logger.warning(message, RuntimeError("the Hub could not be reached"))
        logger.warning("Another bitsandbytes warning")
    assert [record.getMessage().split(":")[-1].split(".")[0].strip() for record in caplog.records] == [
        "the Hub could not be reached", "Another bitsandbytes warning"]


def test_cli_eval_on_the_builtin_task_writes_per_problem_jsonl(arithmetic_models, tmp_path, capsys):
    output = tmp_path / "results"
    code = cli.main(["eval", "--model", arithmetic_models["student"], "--dataset", "builtin", "--num_problems", "20",
                     "--n", "4", "--temperature", "1.0", "--top_p", "1.0", "--output_dir", str(output)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "builtin: 20 problems × 4 samples  mean@4" in printed and "pass@4" in printed

    records = [json.loads(line) for line in (output / "builtin.jsonl").read_text().splitlines()]
    test = load_benchmark("builtin", num_problems=20)
    assert [r["index"] for r in records] == list(range(20))
    assert [r["prompt"] for r in records] == test["prompt"] and [r["answer"] for r in records] == test["answer"]
    for record in records:
        assert len(record["completions"]) == len(record["scores"]) == len(record["completion_tokens"]) == 4
        assert all(score == grade_answer(text, record["answer"]) for text, score in
                   zip(record["completions"], record["scores"], strict=True))
        assert record["num_correct"] == sum(record["scores"])
        assert record["pass_at_k"] == {str(k): pass_at_k(4, record["num_correct"], k) for k in range(1, 5)}
        assert all(1 <= count <= 32 for count in record["completion_tokens"])

    summary = json.loads((output / "summary.json").read_text())
    assert (summary["backend"], summary["num_samples"], summary["temperature"]) == ("transformers", 4, 1.0)
    result = summary["results"]["builtin"]
    scores = [s for r in records for s in r["scores"]]
    assert result["mean_accuracy"] == pytest.approx(sum(scores) / 80)
    assert result["pass_at_k"]["4"] == pytest.approx(sum(r["num_correct"] > 0 for r in records) / 20)
    assert result["mean_completion_tokens"] == pytest.approx(
        sum(c for r in records for c in r["completion_tokens"]) / 80)
    assert 0.0 < result["pass_at_k"]["1"] < result["pass_at_k"]["4"] <= 1.0  # the built-in student is partly right
    assert result["max_new_tokens"] == 32  # the built-in task's budget

    # The same seed gives the same samples.
    cli.main(["eval", "--model", arithmetic_models["student"], "--dataset", "builtin", "--num_problems", "20",
              "--n", "4", "--temperature", "1.0", "--top_p", "1.0", "--output_dir", str(tmp_path / "again")])
    assert (tmp_path / "again" / "builtin.jsonl").read_text() == (output / "builtin.jsonl").read_text()


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", "m", "--n", "0"])
    assert "must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", "m", "--chat_template_kwargs", "[1]"])
    assert "expected a JSON object" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--top_p", "0"], "--top_p: must be in (0, 1], got 0"),
        (["--top_p", "1.5"], "--top_p: must be in (0, 1], got 1.5"),
        (["--temperature", "-0.5"], "--temperature: must be >= 0, got -0.5"),
        (["--top_k", "-1"], "--top_k: must be >= 0, got -1"),
        (["--greedy", "--n", "4"], "--n 4 would repeat it 4 times"),
        (["--greedy", "--temperature", "0.7"], "drop --temperature 0.7"),
        (["--temperature", "0", "--top_p", "0.9"], "drop --top_p/--top_k"),
    ],
)
def test_cli_rejects_bad_sampling_arguments(capsys, arguments, message):
    with pytest.raises(SystemExit) as raised:
        cli.main(["eval", "--model", "m", *arguments])
    assert raised.value.code == 2 and message in capsys.readouterr().err


def test_cli_says_a_local_model_path_does_not_exist(capsys, tmp_path):
    for model in (str(tmp_path / "no-such-model"), "./checkpoints/run/final", "~/missing-model"):
        with pytest.raises(SystemExit):
            cli.main(["eval", "--model", model])
        assert f"--model {model}: no such directory" in capsys.readouterr().err
    file = tmp_path / "model.safetensors"
    file.write_text("")
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", str(file)])
    assert "is a file" in capsys.readouterr().err


def test_cli_greedy_evaluation_and_a_capped_problem_count(arithmetic_models, tmp_path, capsys):
    # --temperature 0 is greedy decoding (one completion per problem), not a division by zero; asking for more problems
    # than the set holds says so and evaluates them all.
    output = tmp_path / "greedy"
    cli.main(["eval", "--model", arithmetic_models["student"], "--dataset", "builtin", "--num_problems", "400",
              "--temperature", "0", "--output_dir", str(output)])
    printed = capsys.readouterr().out
    assert "builtin has 300 problems, fewer than --num_problems 400: evaluating all 300." in printed
    assert "builtin: 300 problems × 1 samples" in printed
    summary = json.loads((output / "summary.json").read_text())
    assert (summary["num_samples"], summary["temperature"], summary["top_p"]) == (1, 0.0, 1.0)
    records = [json.loads(line) for line in (output / "builtin.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(arithmetic_models["student"])
    expected = generate_completions(model, build_tokenizer(), [r["prompt"] for r in records[:16]], max_new_tokens=32)
    assert [r["completions"][0] for r in records[:16]] == expected


# ---------------------------------------------------------------------------------------------------------------------
# The vLLM backend, up to the vLLM call


class _StopAtTheCall(Exception):
    pass


@pytest.fixture
def recording_vllm(monkeypatch):
    """A `vllm` module that records the engine's construction and stops at `generate` (no results are made up)."""
    record = {"engines": [], "generate": []}

    class LLM:
        def __init__(self, **kwargs):
            record["engines"].append(kwargs)

        def generate(self, prompts, sampling_params):
            record["generate"].append({"prompts": prompts, "sampling_params": sampling_params})
            raise _StopAtTheCall

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    # TRL's modules probe for vLLM (`find_spec`) when first imported, which a module made here cannot answer: the
    # ones the vLLM path imports (through the seam) are imported before the fake module is in place.
    import trl_tip._trl_compat  # noqa: F401

    monkeypatch.setitem(sys.modules, "vllm", ModuleType("vllm"))
    monkeypatch.setattr(sys.modules["vllm"], "LLM", LLM, raising=False)
    monkeypatch.setattr(sys.modules["vllm"], "SamplingParams", SamplingParams, raising=False)
    return record


def test_vllm_backend_builds_the_engine_and_one_request_per_problem(recording_vllm, arithmetic_models):
    tokenizer = AutoTokenizer.from_pretrained(arithmetic_models["student"])
    dataset = load_benchmark("builtin", num_problems=3)
    with pytest.raises(_StopAtTheCall):
        evaluation.evaluate_pass_at_k_vllm(
            arithmetic_models["student"], tokenizer, dataset, num_samples=4, max_new_tokens=32, temperature=0.6,
            top_p=0.95, seed=5, chat_template_kwargs={"enable_thinking": False}, tensor_parallel_size=2,
            gpu_memory_utilization=0.5, max_model_len=4096,
        )
    assert recording_vllm["engines"] == [{
        "model": arithmetic_models["student"], "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5,
        "dtype": "auto", "seed": 5, "trust_remote_code": False, "enforce_eager": False, "max_model_len": 4096,
    }]
    (call,) = recording_vllm["generate"]
    expected_ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, enable_thinking=False)["input_ids"]
                    for p in dataset["prompt"]]
    assert call["prompts"] == [{"prompt_token_ids": ids} for ids in expected_ids]
    assert [params.kwargs for params in call["sampling_params"]] == [
        {"n": 4, "temperature": 0.6, "top_p": 0.95, "top_k": -1, "max_tokens": 32, "seed": 5 + 4 * p}
        for p in range(3)
    ]


def test_cli_vllm_backend_stops_at_the_call_and_writes_no_results(recording_vllm, arithmetic_models, tmp_path):
    with pytest.raises(_StopAtTheCall):
        cli.main(["eval", "--backend", "vllm", "--model", arithmetic_models["student"], "--dataset", "builtin",
                  "--num_problems", "2", "--n", "3", "--top_k", "20", "--tensor_parallel_size", "4",
                  "--dtype", "bfloat16", "--enforce_eager", "--output_dir", str(tmp_path)])
    (engine,) = recording_vllm["engines"]
    assert (engine["tensor_parallel_size"], engine["dtype"], engine["seed"]) == (4, "bfloat16", 0)
    assert engine["enforce_eager"] is True
    assert "max_model_len" not in engine
    params = [p.kwargs for p in recording_vllm["generate"][0]["sampling_params"]]
    assert [(p["n"], p["top_k"], p["temperature"], p["top_p"], p["max_tokens"]) for p in params] == [
        (3, 20, 0.6, 0.95, 32)] * 2
    assert list(tmp_path.iterdir()) == []


def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch, arithmetic_models, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    tokenizer = AutoTokenizer.from_pretrained(arithmetic_models["student"])
    with pytest.raises(ImportError, match=r"pip install 'trl-tip\[vllm\]'"):
        evaluation.evaluate_pass_at_k_vllm(arithmetic_models["student"], tokenizer, load_benchmark("builtin", 2))
    output_dir = tmp_path / "eval_results"
    with pytest.raises(ImportError, match="--backend transformers"):
        cli.main(["eval", "--backend", "vllm", "--model", arithmetic_models["student"], "--dataset", "builtin",
                  "--output_dir", str(output_dir)])
    # A run that fails before its first result leaves no output folder behind.
    assert not output_dir.exists()


# ---------------------------------------------------------------------------------------------------------------------
# The training callback


def test_callback_logs_pass_at_k_through_the_trainer(arithmetic_models, tmp_path):
    from trl_tip import PassAtKCallback, TipDistillConfig, TipDistillTrainer

    train = arithmetic_models["dataset"]["train"].select(range(32))
    test = load_benchmark("builtin", num_problems=12)
    trainer = TipDistillTrainer(
        model=arithmetic_models["student"],
        teacher_model=arithmetic_models["teacher"],
        args=training_config(TipDistillConfig, tmp_path, max_steps=3, per_device_train_batch_size=8,
                             learning_rate=5e-4, max_completion_length=32, token_selection="all"),
        train_dataset=train,
    )
    callback = PassAtKCallback(trainer, test, num_samples=3, eval_steps=2, prefix="test")
    trainer.add_callback(callback)
    trainer.train()

    entries = [entry for entry in trainer.state.log_history if "test/mean_accuracy" in entry]
    assert [entry["step"] for entry in entries] == [2, 3]  # every 2 steps, and at the end
    assert [step for step, _ in callback.history] == [2, 3]
    for entry in entries:
        assert set(entry) == {"test/mean_accuracy", "test/pass@1", "test/pass@2", "test/pass@3",
                              "test/mean_completion_tokens", "step", "epoch"}
        assert entry["test/pass@1"] == pytest.approx(entry["test/mean_accuracy"])
    # The trainer's own logs keep their metrics: the callback does not fold them into its entries.
    training = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in training] == [1, 2, 3]
    assert all("tip/kept_fraction" in entry for entry in training)

    # What was logged at the end is the evaluation of the final model, with the callback's seed and settings.
    expected = evaluate_pass_at_k(trainer.model, trainer.processing_class, test, num_samples=3, max_new_tokens=32,
                                  temperature=1.0, batch_size=64, seed=0)
    final = entries[-1]
    assert final["test/mean_accuracy"] == pytest.approx(expected["mean_accuracy"])
    assert final["test/pass@3"] == pytest.approx(expected["pass_at_k"][3])
    assert final["test/mean_completion_tokens"] == pytest.approx(expected["mean_completion_tokens"])


def test_callback_schedule_follows_the_eval_strategy():
    from trl_tip import PassAtKCallback

    dataset = load_benchmark("builtin", num_problems=2)
    def trainer(**args):
        return SimpleNamespace(args=SimpleNamespace(**args))

    assert PassAtKCallback(trainer(eval_strategy="steps", eval_steps=5), dataset).eval_steps == 5
    assert PassAtKCallback(trainer(eval_strategy="no", eval_steps=5), dataset).eval_steps is None
    callback = PassAtKCallback(trainer(eval_strategy="no", max_completion_length=64, temperature=0.7), dataset)
    assert (callback.max_new_tokens, callback.temperature) == (64, 0.7)
    with pytest.raises(ValueError, match="eval_steps must be >= 1"):
        PassAtKCallback(trainer(), dataset, eval_steps=0)
    with pytest.raises(ValueError, match="needs a `answer` column"):
        PassAtKCallback(trainer(), dataset.remove_columns("answer"))


@pytest.mark.parametrize("num_items,world_size", [(3, 2), (7, 3), (4, 4), (2, 4), (1, 1)])
def test_padded_shard_covers_every_item_once_with_equal_shares(num_items, world_size):
    from trl_tip.evaluation import padded_shard

    shards = [padded_shard(num_items, rank, world_size) for rank in range(world_size)]
    per_process = -(-num_items // world_size)
    assert all(len(shard) == per_process for shard in shards)
    real = [shard[: len(range(rank, num_items, world_size))] for rank, shard in enumerate(shards)]
    assert sorted(index for shard in real for index in shard) == list(range(num_items))
    assert all(index == 0 for rank, shard in enumerate(shards) for index in shard[len(real[rank]):])
