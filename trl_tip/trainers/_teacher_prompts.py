"""Teacher prompts that differ from the student's: shared by the trainers whose teacher reads its own prompt."""

from __future__ import annotations

import torch
from trl.trainer.utils import pad


def pad_teacher_prompts(
    prompt_ids: list[torch.Tensor], pad_token_id: int, pad_to_multiple_of: int | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """
    Left-pad the teacher's prompt ids as TRL pads the student's, for the generation output dict.

    The teacher then scores `teacher_prompt_ids ⊕ completion_ids`: the completion is right after the prompt in both
    sequences, so the last `completion_length` positions of each are aligned token for token.

    Returns:
        `dict`: `teacher_prompt_ids` and `teacher_prompt_mask`, `(B, P_teacher)` each.
    """
    return {
        "teacher_prompt_ids": pad(
            prompt_ids, padding_value=pad_token_id, padding_side="left", pad_to_multiple_of=pad_to_multiple_of
        ).to(device),
        "teacher_prompt_mask": pad(
            [torch.ones_like(ids) for ids in prompt_ids],
            padding_value=0,
            padding_side="left",
            pad_to_multiple_of=pad_to_multiple_of,
        ).to(device),
    }
