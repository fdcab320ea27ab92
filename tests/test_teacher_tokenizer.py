"""The teacher-tokenizer check on pairs shaped like real ones: what changes the scored tokens fails, the rest warns."""

import itertools
import warnings
from functools import partial

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_tip import TipDistillConfig, TipDistillTrainer
from trl_tip.tiny_models import build_tokenizer, save_pretrained_pair, tiny_model
from trl_tip.vocabulary import TokenizerComparison, compare_tokenizers, end_of_turn_token
from builders import swap_token_ids, training_config


NUM_PROBLEMS = 4

_config = partial(training_config, TipDistillConfig, per_device_train_batch_size=4, max_steps=1,
                  max_completion_length=8)


def _tokenizer_warnings(caught):
    return [str(warning.message) for warning in caught if "tokenizer" in str(warning.message)]


def _base_tokenizer():
    # A base model's tokenizer: the instruct sibling's vocabulary and chat template, but eos `<|endoftext|>`.
    tokenizer = build_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    return tokenizer


def test_an_in_memory_tokenizer_and_its_reloaded_files_are_the_same(tiny_model_paths):
    # Reloaded next to a qwen2 config, the files become a Qwen2Tokenizer, whose class sets unk_token by default.
    reloaded = AutoTokenizer.from_pretrained(tiny_model_paths["teacher"])
    assert type(reloaded).__name__ == "Qwen2Tokenizer" and reloaded.unk_token is not None
    assert build_tokenizer().unk_token is None
    assert compare_tokenizers(build_tokenizer(), reloaded) == TokenizerComparison()
    assert compare_tokenizers(reloaded, build_tokenizer()) == TokenizerComparison()


def test_compare_tokenizers_names_the_first_differing_id(tmp_path):
    tokenizer = build_tokenizer()
    assert compare_tokenizers(tokenizer, build_tokenizer()) == TokenizerComparison()
    assert end_of_turn_token(tokenizer) == "<|im_end|>"

    tokenizer.save_pretrained(tmp_path)
    swap_token_ids(tmp_path)
    swapped = AutoTokenizer.from_pretrained(tmp_path)
    assert compare_tokenizers(tokenizer, swapped).error == "id 97 is 'a' for the student but 'b' for the teacher"

    other_template = build_tokenizer()
    other_template.chat_template = other_template.chat_template.replace("'<|im_end|>'", "'<|endoftext|>'")
    assert compare_tokenizers(tokenizer, other_template).error == (
        "the chat template ends a turn with '<|im_end|>' for the student but '<|endoftext|>' for the teacher"
    )


def test_padding_token_and_a_missing_chat_template_are_not_errors():
    student, teacher = build_tokenizer(), build_tokenizer()
    teacher.pad_token = "<|im_start|>"  # masked out for both models
    teacher.chat_template = None  # a base teacher: nothing to compare the end of turn with
    assert compare_tokenizers(student, teacher) == TokenizerComparison(
        notes=("pad_token is '<|endoftext|>' (id 256) for the student but '<|im_start|>' (id 257) for the teacher",)
    )


def test_base_and_instruct_eos_is_a_note():
    comparison = compare_tokenizers(build_tokenizer(), _base_tokenizer())
    assert comparison.error is None
    assert comparison.notes == (
        "eos_token is '<|im_end|>' (id 258) for the student but '<|endoftext|>' (id 256) for the teacher",
    )


def test_special_tokens_added_at_the_end_are_a_note():
    instruct = build_tokenizer()
    instruct.add_special_tokens({"additional_special_tokens": ["<think>", "</think>", "<tool_call>", "<a>", "<b>"]})
    comparison = compare_tokenizers(build_tokenizer(), instruct)
    assert comparison.error is None
    assert comparison.notes == ((
        "the teacher's tokenizer has 5 token(s) past the other's (vocab_size 259 for the student, 264 for the "
        "teacher): ids 259-263 ('<think>', '</think>', '<tool_call>', '<a>', ...); every shared id is the same token"
    ),)
    reverse = compare_tokenizers(instruct, build_tokenizer())
    assert reverse.notes[0].startswith("the student's tokenizer has 5 token(s)")


def test_a_permuted_vocabulary_names_the_first_differing_id_and_the_sizes(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    swap_token_ids(tmp_path, "x", "y")
    permuted = AutoTokenizer.from_pretrained(tmp_path)
    assert compare_tokenizers(build_tokenizer(), permuted).error == (
        "id 120 is 'x' for the student but 'y' for the teacher"
    )
    permuted.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert compare_tokenizers(build_tokenizer(), permuted).error == (
        "id 120 is 'x' for the student but 'y' for the teacher (vocab_size 259 for the student, 260 for the teacher)"
    )


@pytest.mark.parametrize(
    "student_as, teacher_as, processing_class",
    list(itertools.product(["path", "instance"], ["path", "instance"], [True, False])),
)
def test_identical_vocabularies_are_accepted_in_every_loading_combination(tiny_model_paths, problems, tmp_path,
                                                                          student_as, teacher_as, processing_class):
    def load(role, kind):
        path = tiny_model_paths[role]
        return path if kind == "path" else AutoModelForCausalLM.from_pretrained(path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TipDistillTrainer(model=load("student", student_as), teacher_model=load("teacher", teacher_as),
                          args=_config(tmp_path), train_dataset=problems,
                          processing_class=build_tokenizer() if processing_class else None)
    assert _tokenizer_warnings(caught) == []


def test_a_base_teacher_of_an_instruct_student_warns_and_trains(tiny_model_paths, problems, tmp_path):
    teacher = save_pretrained_pair(AutoModelForCausalLM.from_pretrained(tiny_model_paths["teacher"]),
                                   _base_tokenizer(), tmp_path / "base-teacher")
    with pytest.warns(UserWarning, match=r"same token, but: eos_token is '<\|im_end\|>' .* Training goes ahead"):
        trainer = TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=teacher,
                                    args=_config(tmp_path / "out"), train_dataset=problems)
    trainer.train()
    assert trainer.state.global_step == 1


def test_a_teacher_with_another_tokenizer_is_refused_naming_the_token(tiny_model_paths, problems, tmp_path):
    tokenizer = build_tokenizer()
    teacher = save_pretrained_pair(AutoModelForCausalLM.from_pretrained(tiny_model_paths["teacher"]), tokenizer,
                                   tmp_path / "teacher")
    swap_token_ids(teacher)
    with pytest.raises(ValueError, match="id 97 is 'a' for the student but 'b' for the teacher.*check_teacher_tokenizer"):
        TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=teacher,
                          args=_config(tmp_path / "out"), train_dataset=problems)
    trainer = TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=teacher,
                                args=_config(tmp_path / "out", check_teacher_tokenizer=False),
                                train_dataset=problems)
    assert trainer.shared_vocab_size is None


def test_a_teacher_of_another_vocab_size_and_tokenizer_is_refused_naming_vocab_size(tiny_model_paths, problems,
                                                                                      tmp_path):
    # As TRL's own check of a teacher of another vocabulary expects: the message names `vocab_size`.
    build_tokenizer().save_pretrained(tmp_path / "tokenizer")
    swap_token_ids(tmp_path / "tokenizer")
    teacher = save_pretrained_pair(tiny_model("teacher", vocab_size=300), AutoTokenizer.from_pretrained(
        tmp_path / "tokenizer"), tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"id 97 is 'a' .*lm_head has vocab_size 259, the teacher's 300"):
        TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=teacher, args=_config(tmp_path / "out"),
                          train_dataset=problems)


def test_a_teacher_built_in_memory_warns_once_that_it_is_not_checked(tiny_model_paths, problems, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=tiny_model("teacher"),
                          args=_config(tmp_path), train_dataset=problems)
    assert _tokenizer_warnings(caught) == [(
        "The teacher (a model built in memory, with no name_or_path) comes with no tokenizer, so the check that it "
        "reads the student's token ids is skipped. Save the teacher's tokenizer next to its weights to have it "
        "checked, or set check_teacher_tokenizer=False if you know the ids agree."
    )]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=tiny_model("teacher"),
                          args=_config(tmp_path, check_teacher_tokenizer=False), train_dataset=problems)
    assert _tokenizer_warnings(caught) == []
