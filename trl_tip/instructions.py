"""The prompts of self-distillation teachers: the teacher is the model itself, reading more than the student does.

- OPSDC (CRISP): the teacher reads the problem with an instruction to be concise; the student reads the problem alone.
  [`build_teacher_prompt`] is the one way to build that teacher's prompt from the student's, for plain-text and
  conversational prompts alike (the instruction replaces the dataset's own lead instruction, when it has one).
- PACED's self-distillation: the teacher reads the problem with privileged context (a reference solution or the final
  answer), laid out by [`add_privileged_context`].
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any


# Exact texts from the OPSDC / CRISP paper (arXiv:2603.05433), Appendix B.
CONCISE_INSTRUCTIONS: dict[str, str] = {
    # "uniform": the same pressure to compress on every problem.
    "v1": (
        "Solve the following math problem concisely and correctly. Be direct: avoid unnecessary elaboration, "
        "redundant steps, or restating the problem. Focus only on the key reasoning steps needed to reach the answer."
    ),
    # "difficulty-aware": correctness first, compress only what the problem does not need.
    "v2": (
        "Solve the following math problem concisely and correctly. Prioritize a correct final answer above brevity. "
        "For straightforward problems, be direct: avoid unnecessary elaboration, redundant steps, or restating the "
        "problem. For difficult or multi-step problems, do NOT over-compress: keep every reasoning step needed for "
        "correctness, including case analysis, edge cases, and a brief check of the final answer. Never omit a step "
        "that the answer depends on."
    ),
}

INSTRUCTION_POSITIONS = ("before", "after", "system")

# The paper's teacher prompt is the instruction, a blank line, then the student's prompt.
INSTRUCTION_SEPARATOR = "\n\n"

# DAPO-Math-17k's lead instruction, "Solve the following math problem step by step." before its answer-format
# sentence ("The last line of your response should be of the form Answer: $Answer (without quotes) where $Answer is
# the answer to the problem."). The OPSDC authors strip it and give the teacher the conciseness instruction in its
# place, keeping the answer-format sentence (HJSang/OPSD_Reasoning_Compression: `extract_question_from_dapo`, and the
# `length_prune_teacher` prompt of config/prompts.json); this pattern removes exactly the step-by-step sentence, so
# the answer format the student is graded on stays in both prompts. It also matches the variants other pipelines
# write ("$ANSWER", "\boxed{$Answer}").
DAPO_MATH_LEAD_PATTERN = (
    r"\ASolve the following math problem step by step\.\s+(?=The last line of your response should be of the form)"
)

# The teacher prompt's layout, by instruction position, when no template is given.
DEFAULT_TEMPLATES = {"before": "{instruction}\n\n{question}", "after": "{question}\n\n{instruction}"}


def resolve_instruction(instruction: str) -> str:
    """
    Turn a key of [`CONCISE_INSTRUCTIONS`] or a custom instruction into the instruction text.

    A value without any whitespace is read as a key: a one-word "instruction" is almost surely a mistyped key (`"v3"`,
    `"V2"`), and reading it as text would silently train towards a meaningless prompt. Anything else is custom text,
    used as given.

    Example:

    ```python
    >>> resolve_instruction("v1").startswith("Solve the following math problem concisely")
    True
    >>> resolve_instruction("Answer briefly.")
    'Answer briefly.'
    ```
    """
    if not isinstance(instruction, str):
        raise TypeError(f"The conciseness instruction must be a string, got {type(instruction).__name__}.")
    if instruction in CONCISE_INSTRUCTIONS:
        return CONCISE_INSTRUCTIONS[instruction]
    if not instruction.strip():
        raise ValueError(
            "The conciseness instruction is empty. Use one of the built-in keys "
            f"{sorted(CONCISE_INSTRUCTIONS)} or write the instruction text."
        )
    if not any(character.isspace() for character in instruction.strip()):
        raise ValueError(
            f"Unknown conciseness instruction key {instruction!r}: the built-in keys are "
            f"{sorted(CONCISE_INSTRUCTIONS)}. A custom instruction is read as text only when it has more than one "
            "word."
        )
    return instruction


def _combine(content: Any, instruction: str, before: bool) -> Any:
    # Message content is either a string or a list of content blocks ({"type": "text", "text": ...}).
    if isinstance(content, str):
        return (
            f"{instruction}{INSTRUCTION_SEPARATOR}{content}"
            if before
            else f"{content}{INSTRUCTION_SEPARATOR}{instruction}"
        )
    if isinstance(content, list):
        block = {"type": "text", "text": instruction}
        return [block, *content] if before else [*content, block]
    raise TypeError(
        f"Cannot add an instruction to message content of type {type(content).__name__}; expected a string or a list "
        "of content blocks."
    )


def _add_instruction(prompt: str | list[dict[str, Any]], instruction: str, position: str = "before"):
    """
    `instruction` added to a prompt, without looking for a lead instruction to replace: the last step of
    [`build_teacher_prompt`]. The input is not modified.

    Args:
        prompt (`str` or `list[dict]`):
            A plain-text prompt or a conversation (TRL's conversational format).
        instruction (`str`):
            The instruction text (see [`resolve_instruction`]).
        position (`str`, *optional*, defaults to `"before"`):
            - `"before"`: instruction, a blank line, then the problem, in the last user turn (the paper's layout);
            - `"after"`: the problem, a blank line, then the instruction, in the last user turn;
            - `"system"`: in the system turn: prepended to an existing system message, else a new system message
              first. Conversational prompts only.

    Returns:
        The prompt in the same format as `prompt`.

    Example:

    ```python
    >>> _add_instruction([{"role": "user", "content": "58+67"}], "Be brief.")
    [{'role': 'user', 'content': 'Be brief.\\n\\n58+67'}]
    ```
    """
    if position not in INSTRUCTION_POSITIONS:
        raise ValueError(f"position must be one of {INSTRUCTION_POSITIONS}, got {position!r}.")
    if isinstance(prompt, str):
        if position == "system":
            raise ValueError(
                "instruction_position='system' needs conversational prompts (lists of chat messages); this prompt is "
                "plain text. Use 'before' or 'after'."
            )
        return _combine(prompt, instruction, before=position == "before")
    if not isinstance(prompt, list) or not all(isinstance(message, dict) for message in prompt):
        raise TypeError(f"A prompt must be a string or a list of chat messages, got {type(prompt).__name__}.")
    messages = copy.deepcopy(prompt)
    if position == "system":
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = _combine(messages[0]["content"], instruction, before=True)
        else:
            messages.insert(0, {"role": "system", "content": instruction})
        return messages
    user_turns = [index for index, message in enumerate(messages) if message.get("role") == "user"]
    if not user_turns:
        raise ValueError("The prompt has no user message to carry the instruction; use instruction_position='system'.")
    last_user = messages[user_turns[-1]]
    last_user["content"] = _combine(last_user["content"], instruction, before=position == "before")
    return messages


def check_teacher_prompt_template(template: str) -> None:
    """Raise `ValueError` unless `template` holds `{instruction}` and `{question}` once each and no other field."""
    import string

    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"teacher_prompt_template {template!r} is not a valid format string: {error}.") from None
    if sorted(fields) != ["instruction", "question"]:
        raise ValueError(
            f"teacher_prompt_template must contain {{instruction}} and {{question}} once each and no other field "
            f"(write literal braces as {{{{ and }}}}); got the fields {fields} in {template!r}."
        )


def strip_lead_instruction(text: str, lead_pattern: str | None = None) -> tuple[str, bool]:
    """
    Remove a dataset's own lead instruction from the start of a prompt text.

    Args:
        text (`str`): The prompt (or its last user turn's) text.
        lead_pattern (`str`, *optional*):
            Regular expression of the lead, matched at the start of `text` (leading whitespace ignored); `None` uses
            [`DAPO_MATH_LEAD_PATTERN`].

    Returns:
        `tuple[str, bool]`: the text without the lead (and without the whitespace that followed it), and whether a
        lead was found. Without a match, `text` is returned unchanged.

    Example:

    ```python
    >>> strip_lead_instruction("Solve the following math problem step by step. The last line of your response "
    ...                        "should be of the form Answer: $Answer.\\n\\nWhat is 1+1?")[0][:13]
    'The last line'
    ```
    """
    pattern = re.compile(DAPO_MATH_LEAD_PATTERN if lead_pattern is None else lead_pattern)
    stripped = text.lstrip()
    match = pattern.match(stripped)
    if match is None or match.end() == 0:
        return text, False
    return stripped[match.end() :].lstrip(), True


def _apply_template(content: Any, instruction: str, template: str, lead_pattern: str | None) -> tuple[Any, bool]:
    # Message content is a string or a list of content blocks; in the latter the first text block is the question.
    if isinstance(content, str):
        question, replaced = strip_lead_instruction(content, lead_pattern)
        return template.format(instruction=instruction, question=question), replaced
    if isinstance(content, list):
        blocks = copy.deepcopy(content)
        for block in blocks:
            if isinstance(block, dict) and block.get("type") == "text":
                block["text"], replaced = _apply_template(block["text"], instruction, template, lead_pattern)
                return blocks, replaced
        return [{"type": "text", "text": template.format(instruction=instruction, question="").strip()}, *blocks], False
    raise TypeError(
        f"Cannot add an instruction to message content of type {type(content).__name__}; expected a string or a list "
        "of content blocks."
    )


def build_teacher_prompt(
    prompt: str | list[dict[str, Any]],
    instruction: str,
    position: str = "before",
    lead_pattern: str | None = None,
    template: str | None = None,
) -> tuple[str | list[dict[str, Any]], bool]:
    """
    The OPSDC teacher's prompt: the conciseness instruction **replaces** the dataset's own lead instruction.

    The prompt's text (its last user turn, for a conversation) is searched for a lead instruction at its start
    (`lead_pattern`, DAPO-Math-17k's "Solve the following math problem step by step." by default). What remains is
    the question; the instruction and the question are laid out by `template` (or, without one, the instruction, a
    blank line and the question for `position="before"`, the reverse for `"after"`). When no lead is recognised the
    question is the whole prompt, so the instruction is simply added to it. With `position="system"` the lead is
    removed from the user turn and the instruction goes into the system turn. The input is not modified.

    Args:
        prompt (`str` or `list[dict]`): A plain-text prompt or a conversation (TRL's conversational format).
        instruction (`str`): The instruction text (see [`resolve_instruction`]).
        position (`str`, *optional*, defaults to `"before"`): `"before"`: in the last user turn, before the question
            (the paper's layout); `"after"`: after it; `"system"`: in the system turn (prepended to an existing system
            message, else a new first message; conversational prompts only).
        lead_pattern (`str`, *optional*): Regular expression of the dataset's lead instruction; `None` for
            [`DAPO_MATH_LEAD_PATTERN`].
        template (`str`, *optional*): Layout with the fields `{instruction}` and `{question}`; only with
            `position` `"before"` or `"after"`.

    Returns:
        `tuple`: the teacher's prompt, in the format of `prompt`, and whether a lead was recognised and replaced.

    Example:

    ```python
    >>> build_teacher_prompt("Solve the following math problem step by step. The last line of your response should "
    ...                      "be of the form Answer: $Answer.\\n\\n1+1?", "Be brief.")
    ('Be brief.\\n\\nThe last line of your response should be of the form Answer: $Answer.\\n\\n1+1?', True)
    ```
    """
    if position not in INSTRUCTION_POSITIONS:
        raise ValueError(f"position must be one of {INSTRUCTION_POSITIONS}, got {position!r}.")
    if template is not None:
        if position == "system":
            raise ValueError(
                "A teacher prompt template lays out the instruction and the question in one turn; it cannot be "
                "combined with instruction_position='system'. Use 'before' (the default) with the template."
            )
        check_teacher_prompt_template(template)
    if isinstance(prompt, str):
        if position == "system":
            raise ValueError(
                "instruction_position='system' needs conversational prompts (lists of chat messages); this prompt is "
                "plain text. Use 'before' or 'after'."
            )
        return _apply_template(prompt, instruction, template or DEFAULT_TEMPLATES[position], lead_pattern)
    if not isinstance(prompt, list) or not all(isinstance(message, dict) for message in prompt):
        raise TypeError(f"A prompt must be a string or a list of chat messages, got {type(prompt).__name__}.")
    messages = copy.deepcopy(prompt)
    user_turns = [index for index, message in enumerate(messages) if message.get("role") == "user"]
    if position == "system":
        replaced = False
        if user_turns:
            last_user = messages[user_turns[-1]]
            last_user["content"], replaced = _apply_template(last_user["content"], "", "{question}{instruction}",
                                                             lead_pattern)
        return _add_instruction(messages, instruction, "system"), replaced
    if not user_turns:
        raise ValueError("The prompt has no user message to carry the instruction; use instruction_position='system'.")
    last_user = messages[user_turns[-1]]
    last_user["content"], replaced = _apply_template(
        last_user["content"], instruction, template or DEFAULT_TEMPLATES[position], lead_pattern
    )
    return messages, replaced


# The privileged prompt of the OPSD authors' teacher, for a reference solution (HJSang/OPSD_OnPolicyDistillation,
# config `opsd_qwen3_teacher`; its dataset-specific answer-format sentence left out), and for a bare final answer.
SOLUTION_PROMPT_TEMPLATE = (
    "## Problem\n{problem}\n\n## Reference Solution\n{context}\n\nAfter understanding the reference solution, solve "
    "the problem step by step using your own approach."
)
ANSWER_PROMPT_TEMPLATE = "{problem}\n\nThe correct final answer is {context}."


def privileged_context_setup(columns: Sequence[str], column: str | None, template: str | None) -> tuple[str, str]:
    """
    The column and the template of the self-distillation teacher's privileged context: the named column (which must
    exist), else `solution` when the dataset has it, else `answer`; the template given, else the reference-solution
    layout or, for the `answer` column, the final-answer one.
    """
    if column is None:
        column = "solution" if "solution" in columns else "answer"
    if column not in columns:
        raise ValueError(
            f"The self-distillation teacher reads the `{column}` column as privileged context, but the dataset has "
            f"columns {list(columns)}. Add a `solution` (reference solution) or `answer` column, or name yours with "
            "privileged_context_column."
        )
    if template is None:
        template = ANSWER_PROMPT_TEMPLATE if column == "answer" else SOLUTION_PROMPT_TEMPLATE
    return column, template


def add_privileged_context(prompt: str | list[dict], context: Any, template: str) -> str | list[dict]:
    """
    The self-distillation teacher's prompt: the last user turn (or a plain-text prompt) rewritten with `template`,
    whose `{problem}` is the original text and `{context}` (or `{answer}`) the privileged context, e.g.
    `"{problem}\\n\\nThe correct final answer is {context}."`. The input is not modified.
    """
    if isinstance(prompt, str):
        return template.format(problem=prompt, context=context, answer=context)
    messages = copy.deepcopy(list(prompt))
    for message in reversed(messages):
        if message.get("role") == "user":
            if not isinstance(message.get("content"), str):
                raise ValueError(
                    "Self-distillation adds the privileged context to the last user turn, which must be plain text; "
                    f"got content of type {type(message.get('content')).__name__}."
                )
            message["content"] = template.format(problem=message["content"], context=context, answer=context)
            return messages
    raise ValueError(
        "Self-distillation adds the privileged context to the last user turn, but the prompt has no user message; "
        "give each conversational prompt a user turn holding the problem."
    )
