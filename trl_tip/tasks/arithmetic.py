"""Two-digit addition worked digit by digit: the built-in task.

A prompt is `"58+67"`; the reference solution adds the digits from the right and writes each carry, then boxes the
sum: `"8+7=15;5+6+1=12;\\boxed{125}"`. The answer is checked with the math reward, like a real math benchmark.

[`prepare_arithmetic_models`] trains, on CPU and in a few minutes, a tiny teacher that solves the task and a smaller
student stopped while only partly competent, and caches both (keyed by task version and seed), so that every trainer
of trl_tip has a teacher worth distilling and a student with room to improve.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict

from ..rewards import grade_answer
from ..tiny_models import build_tokenizer, save_pretrained_pair, tiny_model


# Part of the cache key: bumped whenever the models a cached copy holds would differ (the last time: the student's
# head dimension became 32, which vLLM's CPU kernels accept).
TASK_VERSION = 3


def worked_solution(a: int, b: int) -> str:
    """The reference completion for `a+b`: column additions from the right with carries, then `\\boxed{a+b}`."""
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(digits_a), len(digits_b))):
        terms = [digits_a[i] if i < len(digits_a) else "0", digits_b[i] if i < len(digits_b) else "0"]
        if carry:
            terms.append(str(carry))
        column = sum(int(t) for t in terms)
        steps.append(f"{'+'.join(terms)}={column}")
        carry = column // 10
    return ";".join(steps) + f";\\boxed{{{a + b}}}"


@dataclass(frozen=True)
class ArithmeticTask:
    """
    Settings of the built-in addition task.

    Args:
        num_digits (`int`, defaults to `2`): digits of each operand.
        num_train (`int`, defaults to `7000`): training problems.
        num_validation (`int`, defaults to `200`): problems used only to decide when the student's SFT stops.
        num_test (`int`, defaults to `300`): held-out problems on which accuracy is reported.
        seed (`int`, defaults to `0`): seed of the split and of model training.
    """

    num_digits: int = 2
    num_train: int = 7000
    num_validation: int = 200
    num_test: int = 300
    seed: int = 0

    def __post_init__(self):
        low, high = 10 ** (self.num_digits - 1), 10**self.num_digits
        available = (high - low) ** 2
        needed = self.num_train + self.num_validation + self.num_test
        if needed > available:
            raise ValueError(
                f"ArithmeticTask asks for {needed} distinct problems but only {available} exist with "
                f"num_digits={self.num_digits}; lower num_train/num_validation/num_test."
            )

    @property
    def cache_key(self) -> str:
        return (
            f"arithmetic-v{TASK_VERSION}-d{self.num_digits}-n{self.num_train}-{self.num_validation}-"
            f"{self.num_test}-seed{self.seed}"
        )


def build_arithmetic_dataset(task: ArithmeticTask | None = None) -> DatasetDict:
    """
    Build the train / validation / test splits of the task, disjoint, in TRL's conversational prompt format.

    Each row has `prompt` (a user message), `completion` (the worked solution as an assistant message, for SFT and
    for teacher-written tracks) and `answer` (the sum, as a string, for the math reward).
    """
    task = task or ArithmeticTask()
    low, high = 10 ** (task.num_digits - 1), 10**task.num_digits
    pairs = [(a, b) for a in range(low, high) for b in range(low, high)]
    random.Random(task.seed).shuffle(pairs)
    bounds = {
        "train": (0, task.num_train),
        "validation": (task.num_train, task.num_train + task.num_validation),
        "test": (task.num_train + task.num_validation, task.num_train + task.num_validation + task.num_test),
    }

    def rows(start, end):
        selected = pairs[start:end]
        return {
            "prompt": [[{"role": "user", "content": f"{a}+{b}"}] for a, b in selected],
            "completion": [[{"role": "assistant", "content": worked_solution(a, b)}] for a, b in selected],
            "answer": [str(a + b) for a, b in selected],
        }

    return DatasetDict({name: Dataset.from_dict(rows(*span)) for name, span in bounds.items()})


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: list,
    max_new_tokens: int = 32,
    batch_size: int = 512,
    do_sample: bool = False,
    temperature: float = 1.0,
) -> list[str]:
    """Generate completions (greedy by default) for conversational prompts, in batches, left-padded."""
    was_training = model.training
    model.eval()
    texts = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer.apply_chat_template(
            prompts[start : start + batch_size],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            padding=True,
            return_tensors="pt",
        ).to(model.device)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return texts


def evaluate_accuracy(model, tokenizer, dataset: Dataset, max_new_tokens: int = 32, **generate_kwargs) -> dict:
    """
    Greedy accuracy of `model` on a split with `prompt` and `answer` columns, graded by the math reward.

    Returns:
        `dict`: `accuracy` (fraction in [0, 1]), `mean_completion_tokens`, and `num_problems`.
    """
    completions = generate_completions(model, tokenizer, list(dataset["prompt"]), max_new_tokens, **generate_kwargs)
    scores = [grade_answer(c, gold) or 0.0 for c, gold in zip(completions, list(dataset["answer"]), strict=True)]
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in completions]
    return {
        "accuracy": sum(scores) / len(scores),
        "mean_completion_tokens": sum(lengths) / len(lengths),
        "num_problems": len(scores),
    }


def _sft_tensors(tokenizer, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Tokenise prompt + completion once; the loss mask covers the completion and its end-of-turn token only.
    prompt_ids = tokenizer.apply_chat_template(list(dataset["prompt"]), add_generation_prompt=True, tokenize=True)
    if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
        prompt_ids = prompt_ids["input_ids"]
    sequences, masks = [], []
    for ids, completion in zip(prompt_ids, list(dataset["completion"]), strict=True):
        completion_ids = tokenizer(completion[0]["content"], add_special_tokens=False)["input_ids"]
        completion_ids.append(tokenizer.eos_token_id)
        sequences.append(list(ids) + completion_ids)
        masks.append([0] * len(ids) + [1] * len(completion_ids))
    width = max(map(len, sequences))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    return input_ids, attention, loss_mask


def sft(
    model,
    tokenizer,
    train: Dataset,
    max_steps: int,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    warmup_steps: int = 30,
    seed: int = 0,
    eval_every: int | None = None,
    eval_from: int = 0,
    eval_fn=None,
    stop_when=None,
    log_every: int = 100,
) -> dict:
    """
    Completion-only supervised fine-tuning with AdamW, linear warm-up then linear decay (over `max_steps`).

    When `eval_fn` and `stop_when` are given, `eval_fn(model)` is called every `eval_every` steps from step `eval_from`
    on, and training stops as soon as `stop_when(result)` is true. Returns the number of steps taken and the last evaluation.
    """
    input_ids, attention, loss_mask = _sft_tensors(tokenizer, train)
    generator = torch.Generator().manual_seed(seed)

    def batch_loss():
        index = torch.randint(len(input_ids), (batch_size,), generator=generator)
        ids, mask, target_mask = input_ids[index], attention[index], loss_mask[index]
        return completion_loss(model(input_ids=ids, attention_mask=mask).logits, ids, target_mask)

    return sft_loop(model, batch_loss, max_steps, learning_rate, warmup_steps, eval_every=eval_every,
                    eval_from=eval_from, eval_fn=eval_fn, stop_when=stop_when, log_every=log_every)


def completion_loss(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `(B, T, V)` logits over the positions `target_mask` marks in `input_ids`."""
    targets = input_ids[:, 1:].masked_fill(target_mask[:, 1:] == 0, -100)
    logits = logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def sft_loop(
    model,
    batch_loss,
    max_steps: int,
    learning_rate: float,
    warmup_steps: int,
    eval_every: int | None = None,
    eval_from: int = 0,
    eval_fn=None,
    stop_when=None,
    log_every: int = 100,
) -> dict:
    """
    The optimisation loop of the tasks' supervised fine-tuning: `batch_loss()` draws a batch and returns its loss;
    AdamW (no weight decay), gradients clipped at norm 1, linear warm-up over `warmup_steps` then linear decay to 0 at
    `max_steps`. `eval_fn(model)` runs every `eval_every` steps from step `eval_from` on, and training stops as soon as
    `stop_when(result)` is true. Returns the number of steps taken and the last evaluation.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup_steps, max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))),
    )
    model.train()
    last_eval, step = None, 0
    for step in range(1, max_steps + 1):
        loss = batch_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and step % log_every == 0:
            print(f"  sft step {step}/{max_steps} loss {loss.item():.4f}", flush=True)
        if eval_fn is not None and eval_every and step >= eval_from and step % eval_every == 0:
            last_eval = eval_fn(model)
            model.train()
            if stop_when is not None and stop_when(last_eval):
                break
    model.eval()
    return {"steps": step, "last_eval": last_eval}


def default_cache_dir() -> Path:
    """`$TRL_TIP_CACHE`, else `$XDG_CACHE_HOME/trl_tip`, else `~/.cache/trl_tip`."""
    if os.environ.get("TRL_TIP_CACHE"):
        return Path(os.environ["TRL_TIP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trl_tip"


@dataclass
class _Recipe:
    teacher_steps: int = 500
    student_max_steps: int = 800
    student_eval_every: int = 10
    student_min_steps: int = 150
    # The student's SFT stops at the first check whose validation accuracy lands in this band.
    student_target_low: float = 0.25
    student_target_high: float = 0.55


def prepare_arithmetic_models(
    task: ArithmeticTask | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    verbose: bool = True,
) -> dict:
    """
    Train (or load from cache) the built-in teacher and student for the addition task.

    The teacher (hidden 128, 3 layers) is fine-tuned for 500 steps and solves the task. The student (hidden 64,
    2 layers) is fine-tuned until its accuracy on the validation split first enters 25-55 %, checked every 10 steps,
    so it is partly competent: a stop on measured accuracy rather than a fixed step count, which lands in the band
    robustly across seeds and machines. Test accuracy is measured on the held-out test split and stored in
    `metrics.json` next to the models.

    Args:
        task ([`ArithmeticTask`], *optional*): task settings; the defaults if omitted.
        cache_dir (`str` or `os.PathLike`, *optional*): root of the cache; see [`default_cache_dir`].
        force (`bool`, defaults to `False`): retrain even if a cached copy exists.
        verbose (`bool`, defaults to `True`): print progress.

    Returns:
        `dict`: `teacher` and `student` paths (loadable with `from_pretrained`), `dataset` (the splits) and
        `metrics` (test accuracies, step counts and seconds spent).
    """
    task = task or ArithmeticTask()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = root / task.cache_key
    metrics_path = directory / "metrics.json"
    dataset = build_arithmetic_dataset(task)
    paths = {"teacher": str(directory / "teacher"), "student": str(directory / "student")}
    if metrics_path.exists() and not force:
        return {**paths, "dataset": dataset, "metrics": json.loads(metrics_path.read_text())}

    recipe = _Recipe()
    tokenizer = build_tokenizer()
    started = time.perf_counter()
    torch.manual_seed(task.seed)

    def say(message):
        if verbose:
            print(message, flush=True)

    say(f"Training the built-in teacher ({task.cache_key}) ...")
    teacher = tiny_model("teacher", seed=task.seed, tokenizer=tokenizer)
    sft(teacher, tokenizer, dataset["train"], max_steps=recipe.teacher_steps, seed=task.seed, log_every=100 if verbose else 0)
    teacher_test = evaluate_accuracy(teacher, tokenizer, dataset["test"])
    teacher_seconds = time.perf_counter() - started
    say(f"  teacher test accuracy {teacher_test['accuracy']:.1%} ({teacher_seconds:.0f} s)")

    say("Training the built-in student until it is partly competent ...")
    student = tiny_model("student", seed=task.seed + 1, tokenizer=tokenizer)

    def validation_accuracy(model):
        return evaluate_accuracy(model, tokenizer, dataset["validation"])["accuracy"]

    def in_band(accuracy):
        return recipe.student_target_low <= accuracy <= recipe.student_target_high

    student_run = sft(
        student,
        tokenizer,
        dataset["train"],
        max_steps=recipe.student_max_steps,
        seed=task.seed + 1,
        eval_every=recipe.student_eval_every,
        eval_fn=validation_accuracy,
        eval_from=recipe.student_min_steps,
        stop_when=in_band,
        log_every=100 if verbose else 0,
    )
    student_test = evaluate_accuracy(student, tokenizer, dataset["test"])
    total_seconds = time.perf_counter() - started
    say(
        f"  student stopped after {student_run['steps']} steps at validation accuracy "
        f"{student_run['last_eval']:.1%}; test accuracy {student_test['accuracy']:.1%} ({total_seconds:.0f} s in all)"
    )
    save_pretrained_pair(teacher, tokenizer, paths["teacher"])
    save_pretrained_pair(student, tokenizer, paths["student"])
    metrics = {
        "task": asdict(task),
        "teacher_test_accuracy": teacher_test["accuracy"],
        "student_test_accuracy": student_test["accuracy"],
        "teacher_sft_steps": recipe.teacher_steps,
        "student_sft_steps": student_run["steps"],
        "student_validation_accuracy": student_run["last_eval"],
        "teacher_seconds": teacher_seconds,
        "total_seconds": total_seconds,
        "teacher_parameters": teacher.num_parameters(),
        "student_parameters": student.num_parameters(),
    }
    metrics_path.write_text(json.dumps(metrics, indent=2))
    return {**paths, "dataset": dataset, "metrics": metrics}

