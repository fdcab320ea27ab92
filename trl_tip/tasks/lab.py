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
  [`~trl_tip.build_teacher_prompt`]) the base model writes the concise style, `8+7=15;5+6+1=12;\\boxed{125}`: it is
  trained on a mixture with the exact v1 and v2 texts of [`~trl_tip.CONCISE_INSTRUCTIONS`] and four paraphrases, so it
  follows the intent rather than one string. v2 asks not to over-compress difficult problems and to keep "a brief
  check of the final answer": under v2, level-2 problems keep one check line (`...;check 58+67=125;\\boxed{125}`).
- **Reference solutions** in `solution` (the concise one; PACED's self-distillation context) and the sum in `answer`.

Operands always have two digits, as in the addition task, so the digits sit at fixed places and the models train on a
CPU in minutes. [`~trl_tip.tasks.prepare_lab_models`] (in `lab_preparation`) trains a teacher (the base model of
OPSDC) that writes both styles, and a partly competent student that writes the verbose style and can read a reference
solution given in PACED's self-distillation layout; both are cached by task version and seed, with the measured
preconditions in `metrics.json`.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import torch
from datasets import Dataset, DatasetDict

from ..instructions import (
    CONCISE_INSTRUCTIONS,
    SOLUTION_PROMPT_TEMPLATE,
    add_privileged_context,
    build_teacher_prompt,
)
from .arithmetic import evaluate_accuracy, generate_completions, worked_solution


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
        return build_teacher_prompt(prompt, CONCISE_INSTRUCTIONS[style])[0]
    if style == "paraphrase":
        return build_teacher_prompt(prompt, (rng or random).choice(CONCISE_PARAPHRASES))[0]
    if style == "privileged":
        return add_privileged_context(prompt, solution, SOLUTION_PROMPT_TEMPLATE)
    raise ValueError(f"style must be one of {PROMPT_STYLES}, got {style!r}.")


def styled_split(dataset: Dataset, style: str, instruction: str | None = None) -> Dataset:
    """
    `dataset` with every prompt in `style` (see [`styled_prompt`]); `instruction` replaces the instruction text (for
    `"paraphrase"`, e.g. [`HELD_OUT_PARAPHRASE`]).
    """

    def restyle(row):
        if instruction is not None:
            return {"prompt": build_teacher_prompt(row["prompt"], instruction)[0]}
        return {"prompt": styled_prompt(row["prompt"], style, random.Random(0), row["solution"])}

    return dataset.map(restyle)


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
