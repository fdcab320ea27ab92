"""
What trl_tip asks of vLLM, in the main environment (which has no vLLM): TRL's `VLLMGeneration` is replaced by a
recorder that captures the settings a trainer builds it with and the prompts it is asked to complete, then stops the
run. These are trl_tip's choices (the config fields reach the engine, the student's plain prompts, pass-rate rollouts
K times per problem, weighted draws, the shared vocabulary); no completion is ever fabricated, and nothing here is
evidence of what vLLM does: tests/vllm_engine runs real engines and a real `trl vllm-serve` (`make test-vllm`).
"""

from functools import partial

import pytest
import trl.trainer.distillation_trainer as distillation_module

from trl_tip import OPSDCConfig, OPSDCTrainer, TipDistillConfig, TipDistillTrainer
from trl_tip.tiny_models import build_tokenizer
from builders import training_config


class ReachedVLLM(Exception):
    """Raised where vLLM would generate."""


class RecordingVLLMGeneration:
    instances = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        # As `VLLMGeneration` keeps them: merged into every request's sampling parameters.
        self.generation_kwargs = kwargs.get("generation_kwargs") or {}
        self.calls = []
        RecordingVLLMGeneration.instances.append(self)

    def sync_weights(self):
        pass

    def generate(self, prompts, num_generations, **kwargs):
        self.calls.append(("generate", prompts, num_generations))
        raise ReachedVLLM


@pytest.fixture
def recorder(monkeypatch):
    RecordingVLLMGeneration.instances = []
    monkeypatch.setattr(distillation_module, "is_vllm_available", lambda: True)
    monkeypatch.setattr(distillation_module, "VLLMGeneration", RecordingVLLMGeneration)
    return RecordingVLLMGeneration


NUM_PROBLEMS = 8

_config = partial(training_config, per_device_train_batch_size=4, max_steps=1, max_completion_length=24,
                  temperature=0.9, use_vllm=True, vllm_server_host="127.0.0.1", vllm_server_port=8123,
                  vllm_gpu_memory_utilization=0.3, shuffle_dataset=False)


def _expected_prompt_ids(rows):
    tokenizer = build_tokenizer()
    ids = tokenizer.apply_chat_template([row["prompt"] for row in rows], add_generation_prompt=True)
    return [list(x) for x in (ids["input_ids"] if hasattr(ids, "keys") else ids)]


def _check_reached_vllm(recorder, mode, problems):
    (engine,) = recorder.instances
    assert engine.kwargs["mode"] == mode
    assert engine.kwargs["server_host"] == "127.0.0.1" and engine.kwargs["server_port"] == 8123
    assert engine.kwargs["gpu_memory_utilization"] == 0.3
    assert engine.kwargs["max_completion_length"] == 24 and engine.kwargs["temperature"] == 0.9
    # One completion per prompt, from the student's prompts.
    _, generated_prompts, num_generations = engine.calls[-1]
    assert num_generations == 1
    assert sorted(map(tuple, generated_prompts)) == sorted(map(tuple, _expected_prompt_ids(problems.select(range(4)))))


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_tip_distill_vllm_plumbing(recorder, tiny_model_paths, problems, tmp_path, mode):
    trainer = TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=tiny_model_paths["teacher"],
                                args=_config(TipDistillConfig, tmp_path, vllm_mode=mode), train_dataset=problems)
    with pytest.raises(ReachedVLLM):
        trainer.train()
    _check_reached_vllm(recorder, mode, problems)


def test_padded_heads_restrict_vllm_to_the_shared_tokens(recorder, padded_model_paths, problems, tmp_path):
    # A student and a teacher whose heads are padded differently past the 259-token tokenizer (272 and 300 rows): vLLM
    # may only sample ids both models have rows for, which are the tokenizer's.
    tokenizer = build_tokenizer()
    trainer = TipDistillTrainer(model=padded_model_paths["student"], teacher_model=padded_model_paths["teacher"],
                                args=_config(TipDistillConfig, tmp_path / "out", vllm_mode="colocate"),
                                train_dataset=problems)
    (engine,) = recorder.instances
    assert engine.generation_kwargs["allowed_token_ids"] == list(range(len(tokenizer)))
    assert trainer.generation_kwargs["suppress_tokens"] == list(range(len(tokenizer), 300))


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_opsdc_vllm_plumbing(recorder, tiny_model_paths, problems, tmp_path, mode):
    # The student generates from its plain prompt; only the teacher sees the instruction.
    trainer = OPSDCTrainer(model=tiny_model_paths["student"], args=_config(OPSDCConfig, tmp_path, vllm_mode=mode),
                           train_dataset=problems)
    with pytest.raises(ReachedVLLM):
        trainer.train()
    _check_reached_vllm(recorder, mode, problems)


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_paced_pass_rate_estimation_goes_through_vllm(recorder, tiny_model_paths, problems, tmp_path, mode):
    # Pass rates are estimated before the first step: K rollouts per problem, through the same engine, with the
    # prompt list holding each problem K times in a row (the convention of TRL's vLLM client, which asks the server
    # for n = K completions of each distinct prompt).
    from trl_tip import PacedConfig, PacedTrainer

    args = _config(PacedConfig, tmp_path, vllm_mode=mode, pass_rate_rollouts=3)
    trainer = PacedTrainer(model=tiny_model_paths["student"], teacher_model=tiny_model_paths["teacher"], args=args,
                           train_dataset=problems, reward_funcs="math")
    with pytest.raises(ReachedVLLM):
        trainer.train()
    (engine,) = recorder.instances
    assert engine.kwargs["mode"] == mode and engine.kwargs["server_port"] == 8123
    _, generated_prompts, num_generations = engine.calls[-1]
    assert num_generations == 3
    first_batch = _expected_prompt_ids(problems.select(range(4)))
    assert generated_prompts == [ids for ids in first_batch for _ in range(3)]


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_paced_weighted_sampling_sends_only_drawn_problems_to_vllm(recorder, tiny_model_paths, problems, tmp_path,
                                                                   mode):
    # With a table already in place (as after a resume), the first generation is training's: the problems drawn in
    # proportion to their weight, never one of weight 0.
    import torch

    from trl_tip import PacedConfig, PacedTrainer

    args = _config(PacedConfig, tmp_path, vllm_mode=mode, paced_sampling="sample")
    trainer = PacedTrainer(model=tiny_model_paths["student"], teacher_model=tiny_model_paths["teacher"], args=args,
                           train_dataset=problems, reward_funcs="math")
    rates = torch.tensor([0.0, 0.5, 1.0, 0.25, 0.0, 1.0, 0.75, 0.0])
    trainer.pass_rate_table.set_estimate(torch.arange(8), rates, torch.full((8,), 4))
    trainer.pass_rate_table.estimates = 1
    with pytest.raises(ReachedVLLM):
        trainer.train()
    (engine,) = recorder.instances
    _, generated_prompts, num_generations = engine.calls[-1]
    drawn = trainer.problem_sampler.draw(step=0, num_draws=4).tolist()
    assert num_generations == 1 and set(drawn) <= {1, 3, 6}
    assert generated_prompts == _expected_prompt_ids([problems[i] for i in drawn])
