"""Answer extraction and checking for verifiable math rewards, as TRL reward functions.

A reward function follows TRL's signature `f(completions, answer, **kwargs) -> list[float | None]`, so it can be passed
as `reward_funcs` to `trl.GRPOTrainer` and to the trl_tip trainers. `None` means "cannot be graded" (the gold answer
does not parse); TRL skips such rewards.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from math_verify import parse, verify


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_LINE = re.compile(r"^\s*\**answer\**\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def _last_boxed(text: str) -> str | None:
    # The content of the last \boxed{...}, with nested braces balanced (e.g. \boxed{\frac{1}{2}}).
    starts = [match.end() for match in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for index in range(start, len(text)):
            if text[index] == "{":
                depth += 1
            elif text[index] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:index].strip()
    return None


def extract_answer(text: str) -> str | None:
    """
    Extract the final answer of a completion: the content of the last `\\boxed{...}`, else the last `Answer: ...`
    line, else `None`.

    Example:

    ```python
    >>> extract_answer("8+7=15;5+6+1=12;\\\\boxed{125}")
    '125'
    >>> extract_answer("so the total is 4.\\nAnswer: 4")
    '4'
    ```
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a string, got {type(text).__name__}.")
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    lines = _ANSWER_LINE.findall(text)
    if lines:
        return lines[-1].rstrip(".").removeprefix("$").removesuffix("$").strip()
    return None


def _parse_expression(text: str) -> list:
    # math-verify reads LaTeX inside math delimiters or \boxed{}, and plain expressions; try the forms in turn.
    for candidate in (f"\\boxed{{{text}}}", f"${text}$", text):
        parsed = parse(candidate)
        if parsed:
            return parsed
    return []


# Text that stands for "no answer" rather than for a value ("n/a" would otherwise read as n divided by a).
_PLACEHOLDER = re.compile(r"^\s*(?:n\s*/\s*a|n\.a\.|tbd|unknown|none|null|nan|\?+|-+|—+)\s*$", re.IGNORECASE)
# Braces and blanks only ("{}", "{ }", "{{}}"): an empty LaTeX group, what an empty `\boxed{}` leaves behind.
# math-verify reads "{}" as the empty set, which LaTeX writes `\{\}` or `\emptyset`.
_EMPTY_GROUPS = re.compile(r"[{}\s]+")
# LaTeX text blocks (their content is text, graded as such) and commands (\frac, \sqrt, ...), removed before looking
# for prose.
_TEXT_BLOCK = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{[^{}]*\}")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{3,}")
# Function names an answer may spell without a backslash.
_FUNCTION_NAMES = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log exp sqrt infty inf mod gcd lcm max min deg "
    "det".split()
)


def parse_gold_answer(gold: Any) -> list | None:
    """
    Parse a gold answer with math-verify, or return `None` when it is not a mathematical object.

    math-verify never fails: what it cannot read it returns as the raw string, and letters it reads as a product of
    symbols ("see solution" becomes e²·i·l·n·o²·s²·t·u, which any anagram would match). A gold answer is therefore
    ungradable when it is empty, an empty LaTeX group ("{}"; the empty set is `\\{\\}` or `\\emptyset`), a
    placeholder ("n/a", "none", "???", "-"), parses to no mathematical object ("\\frac{"), or holds a word of three
    or more letters outside LaTeX commands and `\\text{...}` (prose such as "see solution"). Write text answers as
    `\\text{...}` to have them graded.
    """
    if gold is None:
        return None
    text = str(gold).strip()
    if not text or _PLACEHOLDER.match(text) or not _EMPTY_GROUPS.sub("", text):
        return None
    bare = _COMMAND.sub(" ", _TEXT_BLOCK.sub(" ", text))
    if any(word.lower() not in _FUNCTION_NAMES for word in _WORD.findall(bare)):
        return None
    parsed = _parse_expression(text)
    if not any(not isinstance(item, str) for item in parsed):
        return None
    return parsed


def grade_answer(completion: str, gold: Any) -> float | None:
    """
    Grade one completion against a gold answer with math-verify.

    Returns:
        `float | None`: `1.0` when the extracted answer is mathematically equal to the gold one, `0.0` when it is not
        or when the completion has no extractable answer, and `None` when the gold answer itself is not a
        mathematical object ([`parse_gold_answer`]: empty, "{}", "n/a", "see solution", "\\frac{", "???").
    """
    gold_parsed = parse_gold_answer(gold)
    if gold_parsed is None:
        return None
    predicted = extract_answer(completion)
    if predicted is None or predicted == "":
        return 0.0
    predicted_parsed = _parse_expression(predicted)
    if not predicted_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, predicted_parsed) else 0.0


def completion_text(completion: Any, index: int = 0) -> str:
    """The text of a plain (`str`) or conversational (list of messages) completion, with a clear error otherwise."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and all(isinstance(m, dict) for m in completion):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}, ...]
            return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    raise TypeError(
        f"Completion {index} is a {type(completion).__name__}, not a string or a list of chat messages with string "
        "content; the math reward cannot read it."
    )


def math_reward(completions: list, answer: list | None = None, **kwargs) -> list[float | None]:
    """
    Verifiable math reward: `1.0` when the completion's last `\\boxed{}` (or `Answer:` line) equals the gold answer
    under math-verify, `0.0` otherwise, `None` when the gold answer cannot be parsed.

    Works for plain (`str`) and conversational (list of messages) completions. The dataset must have an `answer`
    column, which TRL passes to reward functions as a keyword argument.

    Args:
        completions (`list[str]` or `list[list[dict]]`):
            The generated completions.
        answer (`list`):
            Gold answers, one per completion.
    """
    if answer is None:
        raise ValueError(
            "math_reward needs the gold answers: add an `answer` column to the dataset (TRL passes every extra "
            "dataset column to reward functions as a keyword argument)."
        )
    if len(answer) != len(completions):
        raise ValueError(f"math_reward got {len(completions)} completions but {len(answer)} answers.")
    return [
        grade_answer(completion_text(completion, i), gold)
        for i, (completion, gold) in enumerate(zip(completions, answer, strict=True))
    ]


# Reward functions the trainers and examples accept by name (`reward_funcs="math"`).
BUILTIN_REWARDS = {"math": math_reward, "math_reward": math_reward}
