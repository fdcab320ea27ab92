"""Does a teacher read the student's token ids? Tokenizer comparison and the shared vocabulary of padded heads.

Distillation compares two next-token distributions id by id, so it is meaningful only when id `k` is the same token for
both models. Equal `vocab_size` does not guarantee it (two tokenizers of one size can map the same text to other ids),
and unequal `vocab_size` does not rule it out: Qwen2.5-14B and Qwen2.5-1.5B share one tokenizer of 151,665 tokens but
pad their `lm_head` to 152,064 and 151,936 rows. The rows past the tokenizer are padding no text ever maps to, so the
two models are compared over the rows the tokenizer can produce.
"""

from __future__ import annotations

from typing import Any


_PROBE = "trl-tip end-of-turn probe"
# The padding token is left out: padded positions are masked for both models, so it may differ harmlessly.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token")


def tokenizer_of(processing_class: Any) -> Any:
    """The text tokenizer of a tokenizer or of a multimodal processor (`processor.tokenizer`)."""
    return getattr(processing_class, "tokenizer", processing_class)


def end_of_turn_token(tokenizer: Any) -> str | None:
    """
    The token a tokenizer's chat template writes right after an assistant message (e.g. `<|im_end|>` for ChatML), or
    `None` when the tokenizer has no chat template or the template writes no special token there.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this probe has no end-of-turn token to compare
        return None
    tail = text[text.rfind(_PROBE) + len(_PROBE) :] if _PROBE in text else ""
    specials = sorted(
        {str(token) for token in getattr(tokenizer, "all_special_tokens", [])}
        | {str(token) for token in getattr(tokenizer, "added_tokens_encoder", {})},
        key=len,
        reverse=True,
    )
    first = None
    for token in specials:
        position = tail.find(token)
        if position >= 0 and (first is None or position < first[0]):
            first = (position, token)
    return None if first is None else first[1]


def first_tokenizer_difference(student_tokenizer: Any, teacher_tokenizer: Any) -> str | None:
    """
    Describe the first difference between two tokenizers that would make a teacher score other tokens than the
    student wrote, or return `None` when there is none.

    Compared, in order: the number of tokens, each id's token (id by id from 0), the special tokens (bos, eos, unk:
    string and id; the padding token is masked out and may differ), and, when both have a chat template, the token it
    ends an assistant turn with ([`end_of_turn_token`]).

    Args:
        student_tokenizer, teacher_tokenizer: tokenizers (or processors holding one).

    Returns:
        `str` or `None`: e.g. `"id 1037 is 'ĠTheir' for the student but 'ĠThe' for the teacher"`.
    """
    student, teacher = tokenizer_of(student_tokenizer), tokenizer_of(teacher_tokenizer)
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    student_by_id = {index: token for token, index in student_vocab.items()}
    teacher_by_id = {index: token for token, index in teacher_vocab.items()}
    for index in range(max(len(student), len(teacher))):
        s_token, t_token = student_by_id.get(index), teacher_by_id.get(index)
        if s_token != t_token:
            if s_token is None or t_token is None:
                owner, token = ("teacher", t_token) if s_token is None else ("student", s_token)
                return (
                    f"the student has {len(student)} tokens and the teacher {len(teacher)}: id {index} is {token!r} "
                    f"for the {owner} only"
                )
            return f"id {index} is {s_token!r} for the student but {t_token!r} for the teacher"
    for name in _SPECIAL_TOKEN_NAMES:
        s_token, t_token = getattr(student, name, None), getattr(teacher, name, None)
        s_id, t_id = getattr(student, f"{name}_id", None), getattr(teacher, f"{name}_id", None)
        if (None if s_token is None else str(s_token)) != (None if t_token is None else str(t_token)) or s_id != t_id:
            return f"{name} is {s_token!r} (id {s_id}) for the student but {t_token!r} (id {t_id}) for the teacher"
    s_end, t_end = end_of_turn_token(student), end_of_turn_token(teacher)
    if s_end is not None and t_end is not None and s_end != t_end:
        return f"the chat template ends a turn with {s_end!r} for the student but {t_end!r} for the teacher"
    return None


def shared_vocab_size(student_rows: int, teacher_rows: int, num_tokens: int) -> int | None:
    """
    How many `lm_head` rows the divergence compares: `None` (all of them, as TRL) when both heads have the same number
    of rows, else the tokenizer's `num_tokens` (the rows any text can map to), which both heads must cover.

    Raises:
        ValueError: when the heads differ and one of them has fewer rows than the tokenizer has tokens.
    """
    if student_rows == teacher_rows:
        return None
    if num_tokens > min(student_rows, teacher_rows):
        raise ValueError(
            f"The student's lm_head has {student_rows} rows and the teacher's {teacher_rows}, and the tokenizer has "
            f"{num_tokens} tokens: one head cannot score every token, so the models do not share a vocabulary. Use a "
            "teacher with the student's tokenizer, or GOLD for cross-tokenizer distillation."
        )
    return num_tokens
