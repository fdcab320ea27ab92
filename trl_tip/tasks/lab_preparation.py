"""
Training the lab's models: the supervised mixture that binds each style to its prompt, the teacher's four phases and
the student's stop rule, and [`prepare_lab_models`], which trains (or loads) the pair and measures the lab's
preconditions (see [`trl_tip.tasks.lab`]).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset

from ..instructions import build_teacher_prompt
from ..tiny_models import build_tokenizer, save_pretrained_pair, tiny_model
from .arithmetic import completion_loss, default_cache_dir, evaluate_accuracy, sft_loop
from .lab import (
    CONCISE_PARAPHRASES,
    LAB_MAX_COMPLETION_TOKENS,
    LAB_MAX_POSITIONS,
    LabTask,
    _operands,
    build_lab_dataset,
    check_preconditions,
    measure_preconditions,
    solution_for,
    styled_prompt,
)


# --- training --------------------------------------------------------------------------------------------------------


@dataclass
class _Group:
    """Rows of one prompt style, tokenised once: an optional prefix shared by every row, then right-padded rows."""

    prefix: torch.Tensor | None
    input_ids: torch.Tensor
    attention: torch.Tensor
    loss_mask: torch.Tensor
    # Sampling weight of each row: every level equally likely, however many problems it has.
    row_weights: torch.Tensor


def _tokenised_group(
    tokenizer, prompts: list, completions: list[str], shared_prefix: bool, levels: list[int]
) -> _Group:
    prompt_ids = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True)
    if hasattr(prompt_ids, "keys"):
        prompt_ids = prompt_ids["input_ids"]
    rows = []
    for ids, completion in zip(prompt_ids, completions, strict=True):
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((list(ids), completion_ids))
    prefix = None
    if shared_prefix:
        # The longest common prefix of the prompts (the chat header and the instruction): computed once per batch.
        first = rows[0][0]
        length = min(len(ids) for ids, _ in rows)
        for ids, _ in rows:
            length = next((i for i in range(length) if ids[i] != first[i]), length)
        prefix = torch.tensor(first[:length])
        rows = [(ids[length:], completion_ids) for ids, completion_ids in rows]
    width = max(len(ids) + len(completion_ids) for ids, completion_ids in rows)
    pad = tokenizer.pad_token_id
    input_ids, attention, loss_mask = [], [], []
    for ids, completion_ids in rows:
        sequence = ids + completion_ids
        padding = width - len(sequence)
        input_ids.append(sequence + [pad] * padding)
        attention.append([1] * len(sequence) + [0] * padding)
        loss_mask.append([0] * len(ids) + [1] * len(completion_ids) + [0] * padding)
    counts = {level: levels.count(level) for level in set(levels)}
    row_weights = torch.tensor([1.0 / counts[level] for level in levels])
    return _Group(prefix, torch.tensor(input_ids), torch.tensor(attention), torch.tensor(loss_mask), row_weights)


def prefix_shared_logits(model, prefix: torch.Tensor | None, input_ids: torch.Tensor, attention: torch.Tensor):
    """
    Logits of `model` over `input_ids` (right-padded rows) that all follow the same `prefix`: the prefix is run once,
    its key/value cache repeated over the batch, so a 500-token instruction costs one row rather than one per row.
    Equal, up to float32 summation order, to running every row as prefix + row (gradients included).
    """
    if prefix is None:
        return model(input_ids=input_ids, attention_mask=attention).logits
    cache = model(input_ids=prefix[None], use_cache=True).cache
    cache.batch_repeat_interleave(input_ids.size(0))
    width = prefix.numel()
    mask = torch.cat([attention.new_ones(attention.size(0), width), attention], dim=1)
    positions = torch.arange(width, width + input_ids.size(1)).expand(input_ids.size(0), -1)
    return model(input_ids=input_ids, attention_mask=mask, cache=cache, position_ids=positions,
                 use_cache=False).logits


def mixture_sft(
    model,
    groups: list[tuple[float, _Group]],
    max_steps: int,
    batch_size: int = 32,
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
    Completion-only SFT on a mixture of prompt styles: each step draws one group with its weight, then a batch of its
    rows (every level equally likely), so a batch never pads a 40-token problem to a 500-token instructed one. AdamW,
    linear warm-up then decay; early stop as in [`~trl_tip.tasks.arithmetic.sft`].
    """
    generator = torch.Generator().manual_seed(seed)
    weights = torch.tensor([weight for weight, _ in groups], dtype=torch.float)

    def batch_loss():
        group = groups[torch.multinomial(weights, 1, generator=generator).item()][1]
        index = torch.multinomial(group.row_weights, batch_size, replacement=True, generator=generator)
        ids, attention, target_mask = group.input_ids[index], group.attention[index], group.loss_mask[index]
        # Drop the padding columns every row of this batch has.
        width = int(attention.sum(dim=1).max())
        ids, attention, target_mask = ids[:, :width], attention[:, :width], target_mask[:, :width]
        return completion_loss(prefix_shared_logits(model, group.prefix, ids, attention), ids, target_mask)

    return sft_loop(model, batch_loss, max_steps, learning_rate, warmup_steps, eval_every=eval_every,
                    eval_from=eval_from, eval_fn=eval_fn, stop_when=stop_when, log_every=log_every)


def _style_weights(styles: dict[str, float]) -> list[float]:
    """The weight of each group [`_style_groups`] builds for `styles`, in its order (a paraphrase group each)."""
    weights = []
    for style, weight in styles.items():
        count = len(CONCISE_PARAPHRASES) if style == "paraphrase" else 1
        weights += [weight / count] * count
    return weights


def _style_groups(tokenizer, train: Dataset, styles: dict[str, float], seed: int) -> list[tuple[float, _Group]]:
    rng = random.Random(seed)
    prompts, solutions, levels = list(train["prompt"]), list(train["solution"]), list(train["level"])
    groups = []
    for style, weight in styles.items():
        if style == "paraphrase":
            # One group per paraphrase: each shares its instruction prefix.
            for paraphrase in CONCISE_PARAPHRASES:
                styled = [build_teacher_prompt(p, paraphrase)[0] for p in prompts]
                completions = [solution_for(*_operands(p), style) for p in prompts]
                groups.append((weight / len(CONCISE_PARAPHRASES),
                               _tokenised_group(tokenizer, styled, completions, True, levels)))
            continue
        styled = [styled_prompt(p, style, rng, s) for p, s in zip(prompts, solutions, strict=True)]
        completions = [solution_for(*_operands(p), style) for p in prompts]
        groups.append((weight, _tokenised_group(tokenizer, styled, completions, style in ("v1", "v2"), levels)))
    return groups


# --- preparation -----------------------------------------------------------------------------------------------------


@dataclass
class _LabRecipe:
    # The teacher, first in two phases: the verbose style alone (trained from scratch on the mixture, a model this
    # small did not even learn to copy the problem in 500 steps), then the mixture: 30 % plain (verbose), 70 %
    # instructed (concise, which reads the digits from the prompt and is the harder skill), the instructed share split
    # over v1, v2 and the paraphrases. 300 mixture steps at 40 % plain lost the verbose accuracy and did not learn the
    # concise style (validation 83 / 17 / 3 % plain, 80 / 23 / 23 % with v1, by level).
    teacher_plain_steps: int = 300
    teacher_styles: dict = field(default_factory=lambda: {"plain": 0.3, "v1": 0.25, "v2": 0.25, "paraphrase": 0.2})
    teacher_steps: int = 600
    # A third phase at a lower learning rate, weighted towards the verbose style: after the first two, the plain
    # prompt's accuracy was 96.7 / 83.3 / 98.3 % by level while the instructed one was 98-100 %.
    teacher_final_styles: dict = field(
        default_factory=lambda: {"plain": 0.6, "v1": 0.15, "v2": 0.15, "paraphrase": 0.1}
    )
    teacher_final_steps: int = 200
    teacher_final_learning_rate: float = 1e-3
    # Then the same mixture at half that rate: after the third phase, on another processor, the teacher still mis-added
    # the tens column with a carry in (x+y+1 < 10) on 15 % of level-1 problems, teacher-forced on training rows too
    # (an underfit skill, not a memorised one), 85 % by greedy decoding; 400 steps at 5e-4 brought it to 95 %.
    teacher_polish_steps: int = 400
    teacher_polish_learning_rate: float = 5e-4
    teacher_batch_size: int = 32
    # The student: the verbose style, and a share of prompts with the reference solution in PACED's layout.
    student_styles: dict = field(default_factory=lambda: {"plain": 0.85, "privileged": 0.15})
    student_max_steps: int = 1200
    student_batch_size: int = 32
    student_eval_every: int = 25
    student_min_steps: int = 200
    # The student's SFT stops at the first check whose validation accuracy (plain prompt, every level) is in this band:
    # high enough that it solves some easy problems in every sample (at 35-60 % none had a pass rate of 1).
    student_target_low: float = 0.6
    student_target_high: float = 0.8
    learning_rate: float = 3e-3


def _train_lab_teacher(task: LabTask, recipe: _LabRecipe, tokenizer, train: Dataset, log_every: int):
    """The lab teacher, trained from scratch in four phases: verbose alone, the mixture, then twice reweighted."""
    teacher = tiny_model("teacher", seed=task.seed, tokenizer=tokenizer, max_position_embeddings=LAB_MAX_POSITIONS)
    teacher_groups = _style_groups(tokenizer, train, recipe.teacher_styles, task.seed)
    plain_groups = _style_groups(tokenizer, train, {"plain": 1.0}, task.seed)
    mixture_sft(teacher, plain_groups, max_steps=recipe.teacher_plain_steps, batch_size=recipe.teacher_batch_size,
                learning_rate=recipe.learning_rate, seed=task.seed, log_every=log_every)
    mixture_sft(teacher, teacher_groups, max_steps=recipe.teacher_steps, batch_size=recipe.teacher_batch_size,
                learning_rate=recipe.learning_rate, warmup_steps=10, seed=task.seed, log_every=log_every)
    # The same groups, reweighted (the weights are the first element of each pair, in the styles' order).
    final_weights = _style_weights(recipe.teacher_final_styles)
    final_groups = [(weight, group) for weight, (_, group) in zip(final_weights, teacher_groups, strict=True)]
    mixture_sft(teacher, final_groups, max_steps=recipe.teacher_final_steps, batch_size=recipe.teacher_batch_size,
                learning_rate=recipe.teacher_final_learning_rate, warmup_steps=10, seed=task.seed + 1,
                log_every=log_every)
    mixture_sft(teacher, final_groups, max_steps=recipe.teacher_polish_steps, batch_size=recipe.teacher_batch_size,
                learning_rate=recipe.teacher_polish_learning_rate, warmup_steps=10, seed=task.seed + 2,
                log_every=log_every)
    return teacher


def _train_lab_student(task: LabTask, recipe: _LabRecipe, tokenizer, dataset, log_every: int):
    """The lab student and its run record: SFT until validation accuracy first enters the target band."""
    student = tiny_model("student", seed=task.seed + 1, tokenizer=tokenizer, max_position_embeddings=LAB_MAX_POSITIONS)
    student_groups = _style_groups(tokenizer, dataset["train"], recipe.student_styles, task.seed + 1)

    def validation_accuracy(model):
        return evaluate_accuracy(model, tokenizer, dataset["validation"],
                                 max_new_tokens=LAB_MAX_COMPLETION_TOKENS)["accuracy"]

    student_run = mixture_sft(
        student, student_groups, max_steps=recipe.student_max_steps, batch_size=recipe.student_batch_size,
        learning_rate=recipe.learning_rate, seed=task.seed + 1, eval_every=recipe.student_eval_every,
        eval_from=recipe.student_min_steps, eval_fn=validation_accuracy,
        stop_when=lambda accuracy: recipe.student_target_low <= accuracy <= recipe.student_target_high,
        log_every=log_every,
    )
    return student, student_run


def prepare_lab_models(
    task: LabTask | None = None,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    verbose: bool = True,
) -> dict:
    """
    Train (or load from cache) the lab's teacher and student, and measure the lab's preconditions.

    The teacher (hidden 128, 3 layers) learns both styles, bound to the prompt: verbose on the plain prompt, concise
    after a conciseness instruction. The student (hidden 64, 2 layers) learns the verbose style and reading a reference
    solution, until its validation accuracy first enters 60-80 %: it solves easy levels and fewer hard ones.
    [`measure_preconditions`] runs on the test split; its numbers, the failures of [`check_preconditions`] (none when
    the lab is fit to use) and the seconds spent are stored in `metrics.json` next to the models.

    Args:
        task ([`LabTask`], *optional*): task settings; the defaults if omitted.
        cache_dir (`str` or `os.PathLike`, *optional*): root of the cache; see
            [`~trl_tip.tasks.arithmetic.default_cache_dir`].
        force (`bool`, defaults to `False`): retrain even if a cached copy exists.
        verbose (`bool`, defaults to `True`): print progress.

    Returns:
        `dict`: `teacher` and `student` paths (loadable with `from_pretrained`), `dataset` (the splits) and `metrics`.
    """
    task = task or LabTask()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory = root / task.cache_key
    metrics_path = directory / "metrics.json"
    dataset = build_lab_dataset(task)
    paths = {"teacher": str(directory / "teacher"), "student": str(directory / "student")}
    if metrics_path.exists() and not force:
        return {**paths, "dataset": dataset, "metrics": json.loads(metrics_path.read_text())}

    def say(message):
        if verbose:
            print(message, flush=True)

    recipe = _LabRecipe()
    tokenizer = build_tokenizer()
    started = time.perf_counter()
    torch.manual_seed(task.seed)
    log_every = 100 if verbose else 0

    say(f"Training the lab teacher ({task.cache_key}) ...")
    teacher = _train_lab_teacher(task, recipe, tokenizer, dataset["train"], log_every)
    teacher_seconds = time.perf_counter() - started
    say(f"  teacher trained ({teacher_seconds:.0f} s)")

    say("Training the lab student until it is partly competent ...")
    student, student_run = _train_lab_student(task, recipe, tokenizer, dataset, log_every)
    training_seconds = time.perf_counter() - started
    say(f"  student stopped after {student_run['steps']} steps at validation accuracy {student_run['last_eval']:.1%} "
        f"({training_seconds:.0f} s in all)")
    save_pretrained_pair(teacher, tokenizer, paths["teacher"])
    save_pretrained_pair(student, tokenizer, paths["student"])

    measured = measure_preconditions(teacher, student, tokenizer, dataset, seed=task.seed)
    failures = check_preconditions(measured, task.levels)
    total_seconds = time.perf_counter() - started
    metrics = {
        "task": asdict(task),
        "teacher_test_accuracy": measured["teacher"]["accuracy"],
        "student_test_accuracy": measured["student"]["accuracy"],
        "preconditions": measured,
        "precondition_failures": failures,
        "teacher_sft_steps": (recipe.teacher_plain_steps + recipe.teacher_steps + recipe.teacher_final_steps
                              + recipe.teacher_polish_steps),
        "student_sft_steps": student_run["steps"],
        "student_validation_accuracy": student_run["last_eval"],
        "teacher_seconds": teacher_seconds,
        "training_seconds": training_seconds,
        "total_seconds": total_seconds,
        "threads": torch.get_num_threads(),
        "teacher_parameters": teacher.num_parameters(),
        "student_parameters": student.num_parameters(),
    }
    metrics_path.write_text(json.dumps(metrics, indent=2))
    say(f"  teacher {measured['teacher']['accuracy']:.1%}, student {measured['student']['accuracy']:.1%}; "
        f"preconditions: {'all hold' if not failures else '; '.join(failures)} ({total_seconds:.0f} s in all)")
    return {**paths, "dataset": dataset, "metrics": metrics}
