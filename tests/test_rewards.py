import pytest
import torch

from trl_tip.rewards import extract_answer, grade_answer, math_reward, parse_gold_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8+7=15;5+6+1=12;\\boxed{125}", "125"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("work...\nAnswer: 42", "42"),
        ("Answer: 7.\nmore text\nanswer: $9$", "9"),
        ("no answer here", None),
        ("\\boxed{12", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_math_reward_plain_and_conversational():
    completions = [
        "8+7=15;5+6+1=12;\\boxed{125}",  # right
        "8+7=15;5+6+1=12;\\boxed{126}",  # wrong
        [{"role": "assistant", "content": "Answer: 0.5"}],  # conversational, equivalent form
        "\\boxed{12",  # malformed
        "I do not know",  # no answer
        "ünïcödé \\boxed{√4} 中文",  # unicode around a numeric answer
        "\\boxed{\\frac{1}{2}}",
    ]
    answers = ["125", "125", "\\frac{1}{2}", "12", "3", "7", "0.5"]
    assert math_reward(completions, answer=answers) == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]


def test_unparseable_gold_is_skipped():
    assert grade_answer("\\boxed{3}", "") is None
    assert grade_answer("\\boxed{3}", None) is None
    assert math_reward(["\\boxed{3}"], answer=[None]) == [None]


@pytest.mark.parametrize("gold", ["n/a", "N/A", "see solution", "\\frac{", "???", "-", "none", "  ", "{}", "{ }",
                                  "{{}}"])
def test_gold_that_is_not_a_mathematical_object_is_ungradable(gold):
    # math-verify falls back to the raw string (or a product of letters), so these would grade 0.0 against any answer,
    # and "n/a" would match \boxed{n/a}. An empty group "{}" it reads as the empty set, which LaTeX writes \{\}.
    assert parse_gold_answer(gold) is None
    assert grade_answer("\\boxed{3}", gold) is None
    assert grade_answer(f"\\boxed{{{gold}}}", gold) is None


@pytest.mark.parametrize("gold", ["42", "-3", "\\frac{1}{2}", "2\\sqrt{3}", "x^2+1", "p-q", "(1,2)", "[0,1)", "\\{1,2\\}",
                                  "\\infty", "\\pi", "\\{\\}", "\\emptyset", "x=3", "10\\%", "90^\\circ",
                                  "5\\text{ cm}", "\\text{Evelyn}",
                                  "\\text{(C)}", "A", "\\sin x", "sqrt(2)"])
def test_mathematical_gold_answers_stay_gradable(gold):
    assert parse_gold_answer(gold) is not None
    assert grade_answer(f"\\boxed{{{gold}}}", gold) == 1.0
    assert grade_answer("\\boxed{12345}", gold) == 0.0


def test_missing_answer_column_is_a_clear_error():
    with pytest.raises(ValueError, match="`answer` column"):
        math_reward(["\\boxed{3}"])
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        math_reward(["a", "b"], answer=["1"])


def test_non_string_completion_is_a_clear_error():
    with pytest.raises(TypeError, match="Completion 1 is a int"):
        math_reward(["\\boxed{3}", 3], answer=["3", "3"])
    with pytest.raises(TypeError, match="Completion 0"):
        math_reward([[{"role": "assistant", "content": None}]], answer=["3"])


def _grading_trainer():
    # What the trainers' reward call reads from a trainer: its tokenizer, its state, and TRL's profiling switches.
    from types import SimpleNamespace

    from transformers import TrainerState

    from trl_tip.tiny_models import build_tokenizer

    return SimpleNamespace(
        processing_class=build_tokenizer(),
        state=TrainerState(),
        accelerator=SimpleNamespace(is_main_process=True),
        args=SimpleNamespace(report_to=[]),
    )


def test_reward_table_calls_each_function_as_grpo_does():
    from trl_tip.trainers._rewards import reward_table

    trainer = _grading_trainer()
    tokenizer = trainer.processing_class
    rows = [
        {"prompt": [{"role": "user", "content": "1+1"}], "answer": "2", "level": 1},
        {"prompt": [{"role": "user", "content": "2+2"}], "answer": "4", "level": 2},
    ]
    texts = ["\\boxed{2}", "\\boxed{5}"]
    completion_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    seen = {}

    def levels(prompts, completions, completion_ids, trainer_state, answer, level, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, state=trainer_state, kwargs=kwargs)
        return [float(value) if value == 1 else None for value in level]

    table = reward_table(trainer, [math_reward, levels], rows, completion_ids)
    assert table.shape == (2, 2) and table.dtype == torch.float32
    assert table[:, 0].tolist() == [1.0, 0.0]
    assert table[0, 1].item() == 1.0 and torch.isnan(table[1, 1])  # None: the function could not grade it
    assert seen["prompts"] == [row["prompt"] for row in rows]
    # Conversational prompts: each completion is one assistant message holding the decoded text.
    assert seen["completions"] == [[{"role": "assistant", "content": text}] for text in texts]
    assert seen["ids"] == completion_ids and seen["state"] is trainer.state and seen["kwargs"] == {}


def test_reward_table_refuses_a_wrong_number_of_rewards():
    from trl_tip.trainers._rewards import reward_table

    trainer = _grading_trainer()
    rows = [{"prompt": "1+1", "answer": "2"}, {"prompt": "2+2", "answer": "4"}]

    def short(completions, **kwargs):
        return [1.0]

    with pytest.raises(ValueError, match="'short' returned 1 rewards, but 2 were expected"):
        reward_table(trainer, [short], rows, [[5], [6]])


def test_reward_funcs_resolve_the_same_way_in_every_trainer():
    from trl_tip.trainers._rewards import resolve_reward_funcs

    assert resolve_reward_funcs("math", trainer="T", required=True, purpose="to grade") == [math_reward]
    assert resolve_reward_funcs(None, trainer="T", required=False, purpose="to log") == []
    with pytest.raises(ValueError, match="T needs `reward_funcs` to grade"):
        resolve_reward_funcs(None, trainer="T", required=True, purpose="to grade")
    with pytest.raises(ValueError, match="Unknown reward 'accuracy': T accepts"):
        resolve_reward_funcs(["accuracy"], trainer="T", required=False, purpose="to log")
    with pytest.raises(TypeError, match="T's reward_funcs must be callables"):
        resolve_reward_funcs([3], trainer="T", required=False, purpose="to log")
