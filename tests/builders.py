"""Builders the test modules share. Fixtures live in tests/conftest.py; this is what a module imports by name."""

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
