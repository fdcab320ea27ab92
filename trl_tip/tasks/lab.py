"""Two-digit column addition at three levels of difficulty, in a verbose and a concise style: the built-in lab task.

The addition task ([`trl_tip.tasks.arithmetic`]) is the fast demo; it has one difficulty, one short solution style and
no conciseness mode, so three of the four methods have nothing to act on there. The lab has what they act on:

- **A difficulty spread.** A problem's level is its number of carries: 0 (`23+41`), 1 (`58+34`, `73+52`) or 2
  (`58+67`: the carry out of the ones column makes the tens column carry too), recorded per row in `level`. The
  student solves most level-0 problems and fewer level-2 ones, so its pass rates span (0, 1) (PACED's frontier).
- **Two solution styles.** On the plain prompt the models write a *verbose* solution: they restate the problem, add
  the columns, re-check every column and recap, about 4.5 times the tokens of the *concise* one (TIP's low-entropy
  filler, OPSDC's room to compress):

      58+67: add the columns from the right.
      8+7=15, carry 1
      5+6+1=12, carry 1
      check: 8+7=15, 5+6+1=12
      so 58+67=125
      \\boxed{125}

  With a conciseness instruction in front of the problem (OPSDC's teacher prompt, built with
  [`~trl_tip.add_instruction`]) the base model writes the concise style, `8+7=15;5+6+1=12;\\boxed{125}`: it is
  trained on a mixture with the exact v1 and v2 texts of [`~trl_tip.CONCISE_INSTRUCTIONS`] and four paraphrases, so it
  follows the intent rather than one string. v2 asks not to over-compress difficult problems and to keep "a brief
  check of the final answer": under v2, level-2 problems keep one check line (`...;check 58+67=125;\\boxed{125}`).
- **Reference solutions** in `solution` (the concise one; PACED's self-distillation context) and the sum in `answer`.

Operands always have two digits, as in the addition task, so the digits sit at fixed places and the models train on a
CPU in minutes. [`prepare_lab_models`] trains a teacher (the base model of OPSDC) that writes both styles, and a
partly competent student that writes the verbose style and can read a reference solution given in PACED's
self-distillation layout; both are cached by task version and seed, with the measured preconditions in `metrics.json`.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict

from ..instructions import CONCISE_INSTRUCTIONS, add_instruction
from ..testing import build_tokenizer, save_pretrained_pair, tiny_model
from .arithmetic import default_cache_dir, evaluate_accuracy, generate_completions, worked_solution


# Part of the cache key, bumped whenever the models a cached copy holds would differ (2: a fourth teacher phase; 4:
# the student's head dimension became 32, which vLLM's CPU kernels accept).
LAB_VERSION = 4

# A problem's level: its number of carries.
LEVELS = (0, 1, 2)

# Levels at which v2 ("for difficult or multi-step problems, do NOT over-compress ... a brief check of the final
# answer") keeps a check line.
DIFFICULT_LEVELS = (2,)

# Paraphrases of the conciseness instruction in the base model's training mixture, besides the exact v1 and v2 texts.
CONCISE_PARAPHRASES = (
    "Answer concisely: give only the column sums and the result.",
    "Be brief. Do not restate the problem and do not re-check the steps.",
    "Keep it short and correct: no recap, no repeated steps.",
    "Solve this with only the steps you need.",
)

# Never trained on: measures whether the concise mode follows the intent of an instruction it has not read.
HELD_OUT_PARAPHRASE = "Please be concise and avoid unnecessary elaboration."

# Enough for the longest verbose solution (with its end of turn).
LAB_MAX_COMPLETION_TOKENS = 128

# The models read OPSDC's teacher prompt (the 480-character v2 instruction before the problem) and the completion.
LAB_MAX_POSITIONS = 1024

PROMPT_STYLES = ("plain", "v1", "v2", "paraphrase", "privileged")


def column_terms(a: int, b: int) -> list[tuple[list[str], int]]:
    """The column additions of `a+b` from the right: each column's terms (digits and carry) and their sum."""
    digits_a, digits_b = str(a)[::-1], str(b)[::-1]
    columns, carry = [], 0
    for i in range(max(len(digits_a), len(digits_b))):
        terms = [digits_a[i] if i < len(digits_a) else "0", digits_b[i] if i < len(digits_b) else "0"]
        if carry:
            terms.append(str(carry))
        column = sum(int(t) for t in terms)
        columns.append((terms, column))
        carry = column // 10
    return columns


def concise_solution(a: int, b: int) -> str:
    """The concise style: the column sums, then the boxed sum (the addition task's worked solution)."""
    return worked_solution(a, b)


def checked_solution(a: int, b: int) -> str:
    """The concise style with a brief check of the final answer, which v2 keeps on difficult levels."""
    steps = ";".join(f"{'+'.join(terms)}={column}" for terms, column in column_terms(a, b))
    return f"{steps};check {a}+{b}={a + b};\\boxed{{{a + b}}}"


def verbose_solution(a: int, b: int) -> str:
    """The verbose style: the problem restated, each column with its carry, every column re-checked, a recap."""
    columns = column_terms(a, b)
    lines = [f"{a}+{b}: add the columns from the right."]
    lines += [f"{'+'.join(terms)}={column}, carry {column // 10}" for terms, column in columns]
    lines.append("check: " + ", ".join(f"{'+'.join(terms)}={column}" for terms, column in columns))
    lines += [f"so {a}+{b}={a + b}", f"\\boxed{{{a + b}}}"]
    return "\n".join(lines)


def solution_for(a: int, b: int, style: str) -> str:
    """
    The completion the base model is trained to write for a prompt of `style` (one of `PROMPT_STYLES`): verbose on the
    plain prompt (and when it reads a reference solution), concise under v1 and the paraphrases, and under v2 concise
    on easy levels and concise with a check line on difficult ones.
    """
    if style in ("plain", "privileged"):
        return verbose_solution(a, b)
    if style == "v2" and carries(a, b) in DIFFICULT_LEVELS:
        return checked_solution(a, b)
    if style in ("v1", "v2", "paraphrase"):
        return concise_solution(a, b)
    raise ValueError(f"style must be one of {PROMPT_STYLES}, got {style!r}.")


def carries(a: int, b: int) -> int:
    """The level of `a+b`: how many of its columns carry."""
    return sum(column >= 10 for _, column in column_terms(a, b))


def _pairs_by_level() -> dict[int, list[tuple[int, int]]]:
    pairs = {level: [] for level in LEVELS}
    for a in range(10, 100):
        for b in range(10, 100):
            pairs[carries(a, b)].append((a, b))
    return pairs


@dataclass(frozen=True)
class LabTask:
    """
    Settings of the built-in lab task.

    Args:
        num_train_per_level (`int`, defaults to `1500`): training problems per level.
        num_validation_per_level (`int`, defaults to `30`): problems per level used only to stop the student's SFT and
            to set budgets.
        num_test_per_level (`int`, defaults to `60`): held-out problems per level on which results are reported.
        seed (`int`, defaults to `0`): seed of the splits and of model training.
    """

    num_train_per_level: int = 1500
    num_validation_per_level: int = 30
    num_test_per_level: int = 60
    seed: int = 0

    def __post_init__(self):
        needed = self.num_train_per_level + self.num_validation_per_level + self.num_test_per_level
        for level, pairs in _pairs_by_level().items():
            if needed > len(pairs):
                raise ValueError(
                    f"LabTask asks for {needed} problems per level but level {level} has only {len(pairs)}; lower "
                    "num_train_per_level, num_validation_per_level or num_test_per_level."
                )

    @property
    def levels(self) -> tuple[int, ...]:
        return LEVELS

    @property
    def cache_key(self) -> str:
        return (
            f"lab-v{LAB_VERSION}-n{self.num_train_per_level}-{self.num_validation_per_level}-"
            f"{self.num_test_per_level}-seed{self.seed}"
        )


def build_lab_dataset(task: LabTask | None = None) -> DatasetDict:
    """
    Build the train / validation / test splits of the lab, disjoint, in TRL's conversational prompt format, the levels
    taking turns (so any prefix of a split is balanced across the levels).

    Each row has `prompt` (the plain problem as a user message), `completion` (the verbose solution, the style of the
    plain prompt, for SFT and teacher-written tracks), `solution` (the concise reference solution), `answer` (the sum)
    and `level` (the number of carries).
    """
    task = task or LabTask()
    rng = random.Random(task.seed)
    splits = {"train": [], "validation": [], "test": []}
    for level, pairs in _pairs_by_level().items():
        rng.shuffle(pairs)
        test_end = task.num_test_per_level
        validation_end = test_end + task.num_validation_per_level
        splits["test"] += [(level, pair) for pair in pairs[:test_end]]
        splits["validation"] += [(level, pair) for pair in pairs[test_end:validation_end]]
        train_end = validation_end + task.num_train_per_level
        splits["train"] += [(level, pair) for pair in pairs[validation_end:train_end]]

    def interleaved(selected):
        # Round-robin over the levels, each level in random order: any prefix of a split is balanced across the
        # levels that still have problems (PACED and the bridge train on a prefix of the training split).
        by_level = [[row for row in selected if row[0] == level] for level in task.levels]
        return [row for block in itertools.zip_longest(*by_level) for row in block if row is not None]

    def rows(selected):
        selected = interleaved(selected)
        return {
            "prompt": [[{"role": "user", "content": f"{a}+{b}"}] for _, (a, b) in selected],
            "completion": [[{"role": "assistant", "content": verbose_solution(a, b)}] for _, (a, b) in selected],
            "solution": [concise_solution(a, b) for _, (a, b) in selected],
            "answer": [str(a + b) for _, (a, b) in selected],
            "level": [level for level, _ in selected],
        }

    return DatasetDict({name: Dataset.from_dict(rows(selected)) for name, selected in splits.items()})


def _operands(prompt) -> tuple[int, int]:
    a, b = prompt[-1]["content"].split("+")
    return int(a), int(b)


def styled_prompt(prompt: list[dict], style: str, rng: random.Random | None = None, solution: str | None = None):
    """
    The prompt of a training row of `style`: the plain prompt, the instruction (v1, v2 or a paraphrase drawn with
    `rng`) before the problem as OPSDC gives it to its teacher, or the problem with its reference solution in PACED's
    self-distillation layout.
    """
    if style == "plain":
        return prompt
    if style in ("v1", "v2"):
        return add_instruction(prompt, CONCISE_INSTRUCTIONS[style])
    if style == "paraphrase":
        return add_instruction(prompt, (rng or random).choice(CONCISE_PARAPHRASES))
    if style == "privileged":
        from ..trainers.paced import SOLUTION_PROMPT_TEMPLATE, add_privileged_context

        return add_privileged_context(prompt, solution, SOLUTION_PROMPT_TEMPLATE)
    raise ValueError(f"style must be one of {PROMPT_STYLES}, got {style!r}.")


def styled_split(dataset: Dataset, style: str, instruction: str | None = None) -> Dataset:
    """
    `dataset` with every prompt in `style` (see [`styled_prompt`]); `instruction` replaces the instruction text (for
    `"paraphrase"`, e.g. [`HELD_OUT_PARAPHRASE`]).
    """

    def restyle(row):
        if instruction is not None:
            return {"prompt": add_instruction(row["prompt"], instruction)}
        return {"prompt": styled_prompt(row["prompt"], style, random.Random(0), row["solution"])}

    return dataset.map(restyle)


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
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup_steps, max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))),
    )
    model.train()
    last_eval, step = None, 0
    for step in range(1, max_steps + 1):
        group = groups[torch.multinomial(weights, 1, generator=generator).item()][1]
        index = torch.multinomial(group.row_weights, batch_size, replacement=True, generator=generator)
        ids, attention, target_mask = group.input_ids[index], group.attention[index], group.loss_mask[index]
        # Drop the padding columns every row of this batch has.
        width = int(attention.sum(dim=1).max())
        ids, attention, target_mask = ids[:, :width], attention[:, :width], target_mask[:, :width]
        logits = prefix_shared_logits(model, group.prefix, ids, attention)[:, :-1]
        targets = ids[:, 1:].masked_fill(target_mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
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
                styled = [add_instruction(p, paraphrase) for p in prompts]
                completions = [solution_for(*_operands(p), style) for p in prompts]
                groups.append((weight / len(CONCISE_PARAPHRASES),
                               _tokenised_group(tokenizer, styled, completions, True, levels)))
            continue
        styled = [styled_prompt(p, style, rng, s) for p, s in zip(prompts, solutions, strict=True)]
        completions = [solution_for(*_operands(p), style) for p in prompts]
        groups.append((weight, _tokenised_group(tokenizer, styled, completions, style in ("v1", "v2"), levels)))
    return groups


# --- measurement -----------------------------------------------------------------------------------------------------


def accuracy_by_level(model, tokenizer, dataset: Dataset, max_new_tokens: int = LAB_MAX_COMPLETION_TOKENS) -> dict:
    """
    Greedy accuracy and mean completion tokens of `model` on a split, overall and per level.

    Returns:
        `dict`: `accuracy`, `mean_completion_tokens`, `num_problems` (as [`evaluate_accuracy`]) and `levels`:
        `{level: {"accuracy", "mean_completion_tokens", "num_problems"}}` with string keys.
    """
    overall = evaluate_accuracy(model, tokenizer, dataset, max_new_tokens=max_new_tokens)
    levels = {}
    for level in sorted(set(dataset["level"])):
        subset = dataset.filter(lambda row, level=level: row["level"] == level)
        levels[str(level)] = evaluate_accuracy(model, tokenizer, subset, max_new_tokens=max_new_tokens)
    return {**overall, "levels": levels}


def sampled_pass_rates(model, tokenizer, dataset: Dataset, num_samples: int = 8, temperature: float = 1.0,
                       seed: int = 0, max_new_tokens: int = LAB_MAX_COMPLETION_TOKENS) -> list[float]:
    """Each problem's fraction of `num_samples` sampled completions (temperature `temperature`) graded correct."""
    from ..rewards import grade_answer

    prompts = [prompt for prompt in dataset["prompt"] for _ in range(num_samples)]
    torch.manual_seed(seed)
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens, do_sample=True,
                                       temperature=temperature)
    answers = list(dataset["answer"])
    rates = []
    for index, gold in enumerate(answers):
        scores = [grade_answer(c, gold) or 0.0 for c in completions[index * num_samples : (index + 1) * num_samples]]
        rates.append(sum(scores) / num_samples)
    return rates


def pass_rate_spread(rates: list[float]) -> dict:
    """Shares of problems with pass rate 0, strictly between 0 and 1, and 1."""
    n = len(rates)
    return {"zero": sum(r == 0 for r in rates) / n, "between": sum(0 < r < 1 for r in rates) / n,
            "one": sum(r == 1 for r in rates) / n, "num_problems": n}


def measure_preconditions(teacher, student, tokenizer, dataset: DatasetDict, pass_rate_samples: int = 8,
                          seed: int = 0) -> dict:
    """
    The lab's preconditions, measured on the test split (none of them is about a method's outcome):

    - `concise_mode`: the teacher (the base model of OPSDC) on the plain prompt and with each instruction (v1, v2 and
      an unseen paraphrase): accuracy and mean completion tokens, overall and per level, and the token ratio and
      accuracy difference against the plain prompt;
    - `teacher` and `student`: greedy accuracy per level on the plain prompt;
    - `student_pass_rates`: shares of problems the student solves in none, some or all of `pass_rate_samples` samples
      at T = 1;
    - `student_with_solution`: the student's greedy accuracy per level with the reference solution in PACED's
      self-distillation layout, what PACED's self-distillation teacher (a frozen copy of the student) reads. It is
      measured, not required: self-distillation can help only where it is above `student`.
    """
    test = dataset["test"]
    plain = accuracy_by_level(teacher, tokenizer, test)
    concise = {}
    for name, instruction in (("v1", CONCISE_INSTRUCTIONS["v1"]), ("v2", CONCISE_INSTRUCTIONS["v2"]),
                              ("unseen_paraphrase", HELD_OUT_PARAPHRASE)):
        measured = accuracy_by_level(teacher, tokenizer, styled_split(test, "paraphrase", instruction))
        measured["token_ratio"] = measured["mean_completion_tokens"] / plain["mean_completion_tokens"]
        measured["accuracy_difference"] = measured["accuracy"] - plain["accuracy"]
        concise[name] = measured
    rates = sampled_pass_rates(student, tokenizer, test, num_samples=pass_rate_samples, seed=seed)
    return {
        "teacher": plain,
        "concise_mode": concise,
        "student": accuracy_by_level(student, tokenizer, test),
        "student_pass_rates": {**pass_rate_spread(rates), "samples": pass_rate_samples, "temperature": 1.0},
        "student_with_solution": accuracy_by_level(student, tokenizer, styled_split(test, "privileged")),
    }


def check_preconditions(measured: dict, student_levels: tuple[int, ...] = LEVELS) -> list[str]:
    """
    The preconditions that do not hold, as sentences (an empty list when the lab is fit to use):

    - with v1 and with v2 the teacher writes at most 50 % of its plain-prompt tokens, at accuracy within 2 points;
    - the student's pass rates are strictly between 0 and 1 on at least 30 % of problems, and both 0 and 1 occur;
    - the teacher scores at least 95 % on every level in `student_levels`.
    """
    failures = []
    for name in ("v1", "v2"):
        mode = measured["concise_mode"][name]
        if mode["token_ratio"] > 0.5:
            failures.append(f"with {name} the teacher writes {100 * mode['token_ratio']:.0f} % of its plain-prompt "
                            "tokens (at most 50 % required)")
        if abs(mode["accuracy_difference"]) > 0.02:
            failures.append(f"with {name} the teacher's accuracy moves {100 * mode['accuracy_difference']:+.1f} "
                            "points (within 2 required)")
    spread = measured["student_pass_rates"]
    if spread["between"] < 0.3 or spread["zero"] == 0 or spread["one"] == 0:
        failures.append(f"student pass rates: {100 * spread['zero']:.0f} % at 0, {100 * spread['between']:.0f} % "
                        f"between, {100 * spread['one']:.0f} % at 1 (at least 30 % between, and both 0 and 1, "
                        "required)")
    for level in student_levels:
        accuracy = measured["teacher"]["levels"][str(level)]["accuracy"]
        if accuracy < 0.95:
            failures.append(f"teacher accuracy {100 * accuracy:.1f} % on level {level} (at least 95 % required)")
    return failures


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
    teacher = tiny_model("teacher", seed=task.seed, tokenizer=tokenizer, max_position_embeddings=LAB_MAX_POSITIONS)
    teacher_groups = _style_groups(tokenizer, dataset["train"], recipe.teacher_styles, task.seed)
    plain_groups = _style_groups(tokenizer, dataset["train"], {"plain": 1.0}, task.seed)
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
    teacher_seconds = time.perf_counter() - started
    say(f"  teacher trained ({teacher_seconds:.0f} s)")

    say("Training the lab student until it is partly competent ...")
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
