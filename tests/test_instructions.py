"""The conciseness instructions and the teacher's prompt built from the student's (trl_tip.instructions)."""

import pytest

from trl_tip import CONCISE_INSTRUCTIONS, resolve_instruction
from trl_tip.instructions import _add_instruction, build_teacher_prompt


INSTRUCTION = "Be brief please."


def test_concise_instructions_are_the_paper_texts():
    assert set(CONCISE_INSTRUCTIONS) == {"v1", "v2"}
    assert CONCISE_INSTRUCTIONS["v1"] == (
        "Solve the following math problem concisely and correctly. Be direct: avoid unnecessary elaboration, "
        "redundant steps, or restating the problem. Focus only on the key reasoning steps needed to reach the answer."
    )
    assert CONCISE_INSTRUCTIONS["v2"] == (
        "Solve the following math problem concisely and correctly. Prioritize a correct final answer above brevity. "
        "For straightforward problems, be direct: avoid unnecessary elaboration, redundant steps, or restating the "
        "problem. For difficult or multi-step problems, do NOT over-compress: keep every reasoning step needed for "
        "correctness, including case analysis, edge cases, and a brief check of the final answer. Never omit a step "
        "that the answer depends on."
    )


def test_resolve_instruction_keys_custom_text_and_mistyped_keys():
    assert resolve_instruction("v1") == CONCISE_INSTRUCTIONS["v1"]
    assert resolve_instruction("Answer in one line.") == "Answer in one line."
    with pytest.raises(ValueError, match="Unknown conciseness instruction key 'v3'"):
        resolve_instruction("v3")
    with pytest.raises(ValueError, match="empty"):
        resolve_instruction("  ")


def test_add_instruction_positions():
    conversation = [{"role": "system", "content": "You add."}, {"role": "user", "content": "1+2"}]
    assert _add_instruction(conversation, "Be brief.")[1]["content"] == "Be brief.\n\n1+2"
    assert _add_instruction(conversation, "Be brief.", "after")[1]["content"] == "1+2\n\nBe brief."
    assert _add_instruction(conversation, "Be brief.", "system")[0]["content"] == "Be brief.\n\nYou add."
    user_only = [{"role": "user", "content": "1+2"}]
    assert _add_instruction(user_only, "Be brief.", "system") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+2"},
    ]
    blocks = [{"role": "user", "content": [{"type": "text", "text": "1+2"}]}]
    assert _add_instruction(blocks, "Be brief.")[0]["content"][0] == {"type": "text", "text": "Be brief."}
    assert _add_instruction("1+2", "Be brief.") == "Be brief.\n\n1+2"
    # The caller's prompt is never modified.
    assert conversation[1]["content"] == "1+2" and user_only == [{"role": "user", "content": "1+2"}]
    with pytest.raises(ValueError, match="conversational"):
        _add_instruction("1+2", "Be brief.", "system")
    with pytest.raises(ValueError, match="no user message"):
        _add_instruction([{"role": "system", "content": "hi"}], "Be brief.")


# ---- The teacher prompt: the instruction replaces the dataset's lead ----

# Real prompt texts. DAPO-Math-17k (BytedTsinghua-SIA/DAPO-Math-17k), its first problem, as the dataset stores it:
DAPO_LEAD = (
    "Solve the following math problem step by step. The last line of your response should be of the form Answer: "
    "$Answer (without quotes) where $Answer is the answer to the problem."
)
DAPO_PROBLEM = (
    "In triangle $ABC$, $\\sin \\angle A = \\frac{4}{5}$ and $\\angle A < 90^\\circ$. Let $D$ be a point outside "
    "triangle $ABC$ such that $\\angle BAD = \\angle DAC$ and $\\angle BDC = 90^\\circ$. Suppose that $AD = 1$ and that "
    "$\\frac{BD}{CD} = \\frac{3}{2}$. If $AB + AC$ can be expressed in the form $\\frac{a\\sqrt{b}}{c}$ where $a, b, c$ "
    "are pairwise relatively prime integers, find $a + b + c$."
)
DAPO_REMINDER = 'Remember to put your answer on its own line after "Answer:".'
DAPO_PROMPT = [{"role": "user", "content": f"{DAPO_LEAD}\n\n{DAPO_PROBLEM}\n\n{DAPO_REMINDER}"}]
# MATH-500 (HuggingFaceH4/MATH-500), its first problem: the `problem` column is the bare question.
MATH500_PROBLEM = (
    "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.  Enter your answer in the form "
    "$(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$"
)


def test_dapo_teacher_prompt_has_the_instruction_once_and_no_step_by_step_lead():
    v2 = CONCISE_INSTRUCTIONS["v2"]
    teacher, replaced = build_teacher_prompt(DAPO_PROMPT, v2)
    assert replaced
    content = teacher[0]["content"]
    assert content.count(v2) == 1 and content.startswith(v2)
    assert "step by step" not in content
    # The answer format the student is graded on stays, as in the authors' teacher prompt; so do the problem and the
    # dataset's closing reminder.
    answer_format = DAPO_LEAD.removeprefix("Solve the following math problem step by step. ")
    assert content == f"{v2}\n\n{answer_format}\n\n{DAPO_PROBLEM}\n\n{DAPO_REMINDER}"
    assert DAPO_PROMPT[0]["content"].startswith(DAPO_LEAD)  # the student's prompt is untouched
    # The same as plain text, and with the instruction in the system turn.
    text, replaced = build_teacher_prompt(DAPO_PROMPT[0]["content"], v2)
    assert replaced and text == content
    system, replaced = build_teacher_prompt(DAPO_PROMPT, v2, position="system")
    assert replaced and system[0] == {"role": "system", "content": v2}
    assert system[1]["content"] == f"{answer_format}\n\n{DAPO_PROBLEM}\n\n{DAPO_REMINDER}"


def test_math500_prompt_has_no_lead_so_the_instruction_is_prepended():
    teacher, replaced = build_teacher_prompt([{"role": "user", "content": MATH500_PROBLEM}], INSTRUCTION)
    assert not replaced
    assert teacher == [{"role": "user", "content": f"{INSTRUCTION}\n\n{MATH500_PROBLEM}"}]
    # The same as `_add_instruction` when nothing is recognised.
    assert teacher == _add_instruction([{"role": "user", "content": MATH500_PROBLEM}], INSTRUCTION)


def test_user_lead_pattern_and_template():
    prompt = f"Please reason step by step, and put your final answer within \\boxed{{}}.\n{MATH500_PROBLEM}"
    teacher, replaced = build_teacher_prompt(
        prompt, INSTRUCTION, lead_pattern=r"Please reason step by step[^\n]*\n",
        template="{instruction}\n## Problem\n{question}\nAnswer in \\boxed{{}}.",
    )
    assert replaced
    assert teacher == f"{INSTRUCTION}\n## Problem\n{MATH500_PROBLEM}\nAnswer in \\boxed{{}}."
    # No match: the template still lays the instruction out, around the whole prompt.
    teacher, replaced = build_teacher_prompt(MATH500_PROBLEM, INSTRUCTION, template="{question}\n\n({instruction})")
    assert not replaced and teacher == f"{MATH500_PROBLEM}\n\n({INSTRUCTION})"
    with pytest.raises(ValueError, match="once each"):
        build_teacher_prompt(MATH500_PROBLEM, INSTRUCTION, template="{instruction} only")
    with pytest.raises(ValueError, match="once each"):
        build_teacher_prompt(MATH500_PROBLEM, INSTRUCTION, template="{instruction} {question} {answer}")
