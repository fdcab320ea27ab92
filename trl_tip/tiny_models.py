"""Tiny models built in code: a byte-level tokenizer and small causal LMs that share it, for the tasks and the tests.

Nothing here touches the Hugging Face Hub, so tests, the built-in demo and users without network access can run every
trainer end to end. The tokenizer follows Qwen2's byte-level scheme (one token per byte, no merges, Qwen2's
pre-tokenizer split), so when it is saved next to a `model_type="qwen2"` config and reloaded by `AutoTokenizer` or
`AutoProcessor` as transformers' `Qwen2Tokenizer`, it produces the same ids.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM


PAD_TOKEN = "<|endoftext|>"
BOS_OF_TURN = "<|im_start|>"
END_OF_TURN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_OF_TURN, END_OF_TURN)

# ChatML, as Qwen2/Qwen3 use it, without a default system turn so prompts stay short.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer split; with single-byte tokens it only matters for reload equivalence.
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Model sizes used by the built-in tasks: the teacher has 658 k parameters, the student 132 k. Both keep a head
# dimension of 32 (hidden size / attention heads), the smallest vLLM's CPU attention kernels accept, so the built-in
# models can be served and sampled by vLLM too. The student's single key/value head keeps the parameter count of its
# earlier four heads of 16.
MODEL_SIZES = {
    "teacher": {"hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 384},
    "student": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 192,
    },
}


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map, which byte-level BPE vocabularies are written in.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_tokenizer() -> PreTrainedTokenizerFast:
    """
    Build the offline byte-level tokenizer: 256 byte tokens (id = byte value) followed by `<|endoftext|>` (padding),
    `<|im_start|>` and `<|im_end|>` (end of turn, used as eos). Padding is on the left, as TRL's on-policy trainers
    require, and the chat template is ChatML.

    Returns:
        [`~transformers.PreTrainedTokenizerFast`]: a tokenizer of 259 tokens that encodes any text losslessly.
    """
    byte_map = _bytes_to_unicode()
    vocab = {byte_map[byte]: byte for byte in range(256)}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END_OF_TURN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        truncation_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(size: str = "student", tokenizer: PreTrainedTokenizerFast | None = None, **overrides) -> Qwen2Config:
    """
    Config of a tiny Qwen2 causal LM for the offline tokenizer.

    Args:
        size (`str`, *optional*, defaults to `"student"`):
            `"teacher"` (hidden 128, 3 layers) or `"student"` (hidden 64, 2 layers).
        tokenizer ([`~transformers.PreTrainedTokenizerFast`], *optional*):
            Tokenizer whose special ids are written into the config; built with [`build_tokenizer`] if omitted.
        **overrides:
            Any `Qwen2Config` field, e.g. `vocab_size=32000` for benchmarks.
    """
    if size not in MODEL_SIZES:
        raise ValueError(f"size must be one of {sorted(MODEL_SIZES)}, got {size!r}.")
    tokenizer = tokenizer or build_tokenizer()
    fields = {
        "vocab_size": len(tokenizer),
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
        **MODEL_SIZES[size],
    }
    fields.update(overrides)
    return Qwen2Config(**fields)


def tiny_model(size: str = "student", seed: int = 0, tokenizer=None, **overrides) -> Qwen2ForCausalLM:
    """A randomly initialised tiny Qwen2 causal LM (see [`tiny_config`]), reproducible from `seed`."""
    import torch

    config = tiny_config(size, tokenizer=tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def save_pretrained_pair(model, tokenizer, path: str | os.PathLike) -> str:
    """Save a model with its tokenizer so `from_pretrained(path)` (and TRL's loading by path) rebuilds both."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_tiny_models(directory: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """
    Create a randomly initialised tiny teacher and student sharing the offline tokenizer, and save each with the
    tokenizer under `directory`.

    Returns:
        `dict[str, str]`: paths keyed `"teacher"` and `"student"`, each loadable with `from_pretrained`.
    """
    tokenizer = build_tokenizer()
    return {
        size: save_pretrained_pair(tiny_model(size, seed=seed + i, tokenizer=tokenizer), tokenizer, Path(directory) / size)
        for i, size in enumerate(("teacher", "student"))
    }
