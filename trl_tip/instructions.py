"""Conciseness instructions for self-distillation, and the prompt edit that gives them to the teacher.

In OPSDC (CRISP) the teacher is the model itself reading the problem together with an instruction to be concise; the
student reads the problem alone. [`add_instruction`] builds the teacher's prompt from the student's one, for plain-text
and conversational prompts alike.
"""

from __future__ import annotations

import copy
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


def add_instruction(prompt: str | list[dict[str, Any]], instruction: str, position: str = "before"):
    """
    Give `instruction` to a prompt, as the teacher of OPSDC sees it. The input is not modified.

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
    >>> add_instruction([{"role": "user", "content": "58+67"}], "Be brief.")
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
