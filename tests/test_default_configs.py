"""With `args=None`, every trainer builds its own config, named `<model>-<method>` as TRL's trainers do, before it loads
a model."""

import pytest
from datasets import Dataset

from trl_tip import (
    ACEGRPOConfig,
    ACEGRPOTrainer,
    OPSDCConfig,
    OPSDCTrainer,
    PacedConfig,
    PacedTrainer,
    TipDistillConfig,
    TipDistillTrainer,
    math_reward,
)


# A student that cannot be loaded (no such local path, and the Hub is offline in tests): if a trainer loaded it before
# building its default config, construction would fail without any config being built.
STUDENT = "nowhere/Tiny-Student"

CASES = {
    "tip": (TipDistillTrainer, TipDistillConfig, {"teacher_model": "nowhere/Tiny-Teacher"}, "Tiny-Student-TIP"),
    "paced": (PacedTrainer, PacedConfig, {"teacher_model": "nowhere/Tiny-Teacher", "reward_funcs": math_reward},
              "Tiny-Student-PACED"),
    "opsdc": (OPSDCTrainer, OPSDCConfig, {}, "Tiny-Student-OPSDC"),
    "ace": (ACEGRPOTrainer, ACEGRPOConfig, {"reward_funcs": math_reward}, "Tiny-Student-ACE-GRPO"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_default_config_is_built_first_and_named_after_the_model(name, monkeypatch, tmp_path):
    trainer_class, config_class, kwargs, expected_output_dir = CASES[name]
    monkeypatch.chdir(tmp_path)  # the default output directory is relative
    built = []
    post_init = config_class.__post_init__

    def record(self):
        built.append((type(self), self.output_dir))
        post_init(self)

    monkeypatch.setattr(config_class, "__post_init__", record)
    dataset = Dataset.from_dict({"prompt": ["What is 1 + 1?"], "answer": ["2"]})
    # Construction stops at the first thing that cannot be done here: the student's load, or (on a machine without
    # bf16 support) the default config's own bf16 check, as for TRL's defaults.
    with pytest.raises((OSError, ValueError)):
        trainer_class(model=STUDENT, args=None, train_dataset=dataset, **kwargs)
    assert built, f"{trainer_class.__name__} tried to load the model before building its default config"
    assert built[0] == (config_class, expected_output_dir)
