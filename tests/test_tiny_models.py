import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

from trl_tip.tiny_models import build_tokenizer, tiny_model


TEXTS = [
    "58+67",
    "8+7=15;5+6+1=12;\\boxed{125}",
    "Solve the following math problem concisely.\n\nBe direct:  avoid   steps.\t(tab)",
    "unicode: ünïcödé 中文 ∑ √2 🙂",
    " leading space and trailing newline\n",
]


def test_tokenizer_properties():
    tokenizer = build_tokenizer()
    assert len(tokenizer) == 259
    assert tokenizer.padding_side == "left"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # One token per byte, id = byte value: lossless for any text.
    assert tokenizer("A+1")["input_ids"] == [65, 43, 49]
    for text in TEXTS:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_chat_template_and_generation_prompt():
    tokenizer = build_tokenizer()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1+2"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n1+2<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "1+2"}], add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_save_reload_round_trip_gives_identical_ids(tiny_model_paths):
    # Saved next to a qwen2 config, the tokenizer is reloaded as transformers' Qwen2Tokenizer: ids must not change.
    tokenizer = build_tokenizer()
    for loader in (AutoTokenizer, AutoProcessor):
        reloaded = loader.from_pretrained(tiny_model_paths["student"])
        assert reloaded.padding_side == "left"
        assert reloaded.eos_token_id == tokenizer.eos_token_id
        assert reloaded.pad_token_id == tokenizer.pad_token_id
        for text in TEXTS:
            assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"], (loader.__name__, text)
            assert reloaded.decode(reloaded(text)["input_ids"]) == text
        messages = [{"role": "user", "content": "12+34"}]
        assert reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )


def test_tiny_models_load_by_path(tiny_model_paths):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_paths["teacher"])
    student = AutoModelForCausalLM.from_pretrained(tiny_model_paths["student"])
    assert teacher.config.vocab_size == student.config.vocab_size == 259
    assert teacher.num_parameters() > 3 * student.num_parameters()
    assert student.generation_config.eos_token_id == build_tokenizer().eos_token_id
    ids = torch.tensor([[1, 2, 3]])
    assert student(ids).logits.shape == (1, 3, 259)


def test_tiny_model_is_reproducible():
    a, b = tiny_model("student", seed=3), tiny_model("student", seed=3)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_import_needs_no_experimental_trl():
    code = (
        "import sys, trl_tip, trl_tip.tiny_models, trl_tip.tasks;"
        "bad = [m for m in sys.modules if m.startswith('trl.experimental')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    # The trainers stand on TRL's stable trainers: TRL's own shims import `trl.experimental.utils`, but no
    # experimental trainer (GKD) is ever loaded.
    code = (
        "import sys, trl_tip;"
        "[getattr(trl_tip, name) for name in trl_tip.__all__];"
        "bad = [m for m in sys.modules if m.startswith('trl.experimental.') and m != 'trl.experimental.utils'];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
