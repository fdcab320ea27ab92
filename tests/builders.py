"""Builders the test modules share. Fixtures live in tests/conftest.py; this is what a module imports by name."""

import json
from pathlib import Path


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
