"""Builders the test modules share. Fixtures live in tests/conftest.py; this is what a module imports by name."""

import json
from pathlib import Path

from trl_tip.tiny_models import build_tokenizer, save_pretrained_pair, tiny_model


# What every short test run on the tiny models sets: float32, nothing reported or saved, every step logged, seeded.
SHORT_RUN = {
    "bf16": False,
    "report_to": "none",
    "save_strategy": "no",
    "logging_steps": 1,
    "seed": 0,
    "disable_tqdm": True,
}


def training_config(config_class, output_dir: str | Path, **overrides):
    """
    A `config_class` (a trl_tip or TRL training config) for a short test run writing under `output_dir`: the settings
    of `SHORT_RUN`, then `overrides`. A test module binds its own defaults with `functools.partial`.
    """
    return config_class(**{"output_dir": str(output_dir), **SHORT_RUN, **overrides})


def swap_token_ids(directory: str | Path, first: str = "a", second: str = "b"):
    """Exchange two tokens' ids in the tokenizer saved under `directory`: same size, other ids for the same text."""
    file = Path(directory) / "tokenizer.json"
    data = json.loads(file.read_text())
    vocab = data["model"]["vocab"]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    file.write_text(json.dumps(data))


# The byte-level test tokenizer has 259 tokens; like Qwen2.5-1.5B (151,936 rows) and Qwen2.5-14B (152,064 rows) over a
# 151,665-token tokenizer, the padded pair's student and teacher pad their heads to different sizes past it.
PADDED_HEAD_ROWS = {"student": 272, "teacher": 300}


def save_padded_pair(directory: str | Path) -> dict[str, str]:
    """A tiny student and teacher over the test tokenizer with `PADDED_HEAD_ROWS` head rows, saved under `directory`."""
    tokenizer = build_tokenizer()
    return {
        size: save_pretrained_pair(
            tiny_model(size, seed=seed, tokenizer=tokenizer, vocab_size=PADDED_HEAD_ROWS[size]), tokenizer,
            Path(directory) / size,
        )
        for size, seed in (("student", 1), ("teacher", 2))
    }
