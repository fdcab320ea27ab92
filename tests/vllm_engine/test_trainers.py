"""
Every trainer generates with a real vLLM engine on this CPU, colocated in the training process and served by
`trl vllm-serve`: vLLM writes every completion (transformers' `generate` refuses to run), the weights are pushed
before each step's generation, the losses are finite, and the engine's greedy output follows the pushed weights.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
import transformers

from trl_tip.tasks import build_arithmetic_dataset
from trl_tip.tiny_models import build_tokenizer, tiny_model


pytestmark = pytest.mark.vllm

MODES = ["colocate", "server"]
STEPS = 2
BATCH = 4
MAX_TOKENS = 12
PASS_RATE_ROLLOUTS = 4


def parity_reward(completions, **kwargs):
    """1 for a completion of even length: the random student then has pass rates strictly between 0 and 1."""
    return [float(len(completion[0]["content"]) % 2 == 0) for completion in completions]


@pytest.fixture(scope="module")
def prompts():
    return build_arithmetic_dataset()["train"].select(range(8))


def _settings(tmp_path, mode, server_url):
    settings = {
        "output_dir": str(tmp_path), "per_device_train_batch_size": BATCH, "max_steps": STEPS, "bf16": False,
        "report_to": "none", "save_strategy": "no", "max_completion_length": MAX_TOKENS, "learning_rate": 1e-3,
        "logging_steps": 1, "use_vllm": True, "vllm_mode": mode, "vllm_max_model_length": 512,
        "shuffle_dataset": False, "seed": 0,
    }  # fmt: skip
    if mode == "server":
        settings["vllm_server_base_url"] = server_url
    return settings


def build_trainer(name, mode, paths, prompts, tmp_path, server_url):
    """The trainer `name` in vLLM `mode`, and how many completions vLLM must write in `STEPS` steps."""
    settings = _settings(tmp_path, mode, server_url)
    trained = STEPS * BATCH
    if name == "tip":
        from trl_tip import TipDistillConfig, TipDistillTrainer

        args = TipDistillConfig(**settings, token_selection="soft_or", token_ratio=0.5)
        trainer = TipDistillTrainer(model=paths["student"], teacher_model=paths["teacher"], args=args,
                                    train_dataset=prompts)
        return trainer, trained
    if name.startswith("paced"):
        from trl_tip import PacedConfig, PacedTrainer

        args = PacedConfig(**settings, paced_sampling=name.removeprefix("paced_"),
                           pass_rate_rollouts=PASS_RATE_ROLLOUTS)
        trainer = PacedTrainer(model=paths["student"], teacher_model=paths["teacher"], args=args,
                               train_dataset=prompts, reward_funcs=parity_reward)
        # The pass rates of all 8 problems are estimated through vLLM before the first step.
        return trainer, trained + len(prompts) * PASS_RATE_ROLLOUTS
    if name == "opsdc":
        from trl_tip import OPSDCConfig, OPSDCTrainer

        trainer = OPSDCTrainer(model=paths["student"], args=OPSDCConfig(**settings), train_dataset=prompts)
        return trainer, trained
    if name == "ace":
        from trl_tip import ACEGRPOConfig, ACEGRPOTrainer

        args = ACEGRPOConfig(**settings, num_generations=2, beta=0.0)
        trainer = ACEGRPOTrainer(model=paths["student"], reward_funcs=parity_reward, args=args,
                                 train_dataset=prompts)
        return trainer, trained
    raise ValueError(name)


class Recorder:
    """What a trainer asked of its vLLM backend and what each training step returned."""

    def __init__(self, trainer):
        self.generated = 0
        self.sync_steps = []
        self.losses = []
        backend = trainer.vllm_generation
        generate, sync_weights, training_step = backend.generate, backend.sync_weights, trainer.training_step

        def counting_generate(*args, **kwargs):
            prompt_ids, completion_ids, *rest = generate(*args, **kwargs)
            self.generated += len(completion_ids)
            return (prompt_ids, completion_ids, *rest)

        def recording_sync():
            self.sync_steps.append(trainer.state.global_step)
            sync_weights()

        def recording_step(*args, **kwargs):
            loss = training_step(*args, **kwargs)
            self.losses.append(loss.detach().float().item())
            return loss

        backend.generate, backend.sync_weights, trainer.training_step = (
            counting_generate, recording_sync, recording_step,
        )  # fmt: skip


@pytest.fixture
def transformers_generate_refused(monkeypatch):
    """Any call of transformers' `generate` (student, teacher, PEFT wrapper) fails the test."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("transformers' generate was called: vLLM must write every completion")

    monkeypatch.setattr(transformers.GenerationMixin, "generate", refuse)


def _engine_greedy(backend, prompt_ids: list[list[int]]) -> list[list[int]]:
    """The engine's greedy completions of `prompt_ids`, asked the way the backend's mode allows."""
    if backend.mode == "colocate":
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        outputs = backend.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]
    return backend.vllm_client.generate(prompts=prompt_ids, n=1, temperature=0.0, max_tokens=MAX_TOKENS)[
        "completion_ids"
    ]


@torch.no_grad()
def assert_greedy_follows(model, prompt_ids, engine_completions, eos_token_id):
    """
    The engine's greedy completions are `model`'s greedy completions, token by token. Both run in float32 but sum in
    different orders, so at a near tie (top two logits within float32 rounding of the logits' scale) the argmax may
    differ legitimately; the comparison of that sequence stops there. Anything else is a mismatch.
    """
    model = model.eval()
    for prompt, completion in zip(prompt_ids, engine_completions, strict=True):
        ids = torch.tensor([prompt])
        for token in completion:
            logits = model(input_ids=ids).logits[0, -1].float()
            best = int(logits.argmax())
            if token != best:
                tolerance = 1e-4 * max(1.0, logits.abs().max().item())
                gap = (logits[best] - logits[token]).item()
                assert gap <= tolerance, (
                    f"the engine wrote token {token} where the model's greedy choice is {best} (logit gap {gap:.3g} "
                    f"> {tolerance:.3g}): the engine does not hold the model's weights"
                )
                break
            if token == eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        else:
            assert len(completion) == MAX_TOKENS or completion[-1] == eos_token_id


def _prompt_ids(prompts):
    tokenizer = build_tokenizer()
    encoded = tokenizer.apply_chat_template(list(prompts["prompt"]), add_generation_prompt=True)
    return [list(ids) for ids in (encoded["input_ids"] if hasattr(encoded, "keys") else encoded)]


def _release(trainer):
    # One colocated engine at a time: each holds its own KV cache.
    del trainer.vllm_generation
    gc.collect()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["tip", "paced_weight", "paced_sample", "opsdc", "ace"])
def test_trainer_generates_with_vllm(name, mode, tiny_model_paths, prompts, tmp_path, transformers_generate_refused,
                                     request):
    from trl_tip.vllm_cpu import CPUVLLMGeneration

    server_url = request.getfixturevalue("served_student") if mode == "server" else None
    trainer, expected_completions = build_trainer(name, mode, tiny_model_paths, prompts, tmp_path, server_url)
    assert type(trainer.vllm_generation) is CPUVLLMGeneration
    recorder = Recorder(trainer)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    trainer.train()

    assert trainer.state.global_step == STEPS
    # vLLM wrote every completion trained on (and every pass-rate rollout): transformers' generate refused to run.
    assert recorder.generated == expected_completions
    # The weights were pushed before each step's generation: the initial ones, then those after step 1.
    assert recorder.sync_steps == list(range(STEPS))
    assert len(recorder.losses) == STEPS and all(math.isfinite(loss) for loss in recorder.losses)
    if name != "ace":  # a GRPO group whose rewards tie has no advantage, hence no update
        assert any(not torch.equal(initial[n], p) for n, p in trainer.model.named_parameters())

    # What the next step would do: push the trained weights; the engine then answers as the trained model does.
    trainer.vllm_generation.sync_weights()
    prompt_ids = _prompt_ids(prompts)
    engine_completions = _engine_greedy(trainer.vllm_generation, prompt_ids)
    assert_greedy_follows(trainer.model, prompt_ids, engine_completions, build_tokenizer().eos_token_id)
    _release(trainer)


@pytest.mark.parametrize("mode", MODES)
def test_engine_follows_pushed_weights(mode, tiny_model_paths, prompts, tmp_path, request):
    # Weights of another initialisation loaded into the training model: after a push the engine's greedy output is
    # the new model's, and no longer the old one's.
    from trl_tip import TipDistillConfig, TipDistillTrainer

    server_url = request.getfixturevalue("served_student") if mode == "server" else None
    args = TipDistillConfig(**_settings(tmp_path, mode, server_url))
    trainer = TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=tiny_model_paths["teacher"],
                                args=args, train_dataset=prompts)
    eos = build_tokenizer().eos_token_id
    prompt_ids = _prompt_ids(prompts)
    trainer.vllm_generation.sync_weights()
    before = _engine_greedy(trainer.vllm_generation, prompt_ids)
    assert_greedy_follows(trainer.model, prompt_ids, before, eos)

    other = tiny_model("student", seed=7, tokenizer=build_tokenizer())
    trainer.model.load_state_dict(other.state_dict())
    trainer.vllm_generation.sync_weights()
    after = _engine_greedy(trainer.vllm_generation, prompt_ids)
    assert after != before
    assert_greedy_follows(other, prompt_ids, after, eos)
    _release(trainer)


def test_lora_adapters_are_merged_into_the_push(tiny_model_paths, prompts, tmp_path):
    # A LoRA student: the engine holds the base weights with the adapters merged, as TRL pushes them.
    from peft import LoraConfig

    from trl_tip import TipDistillConfig, TipDistillTrainer

    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    trainer = TipDistillTrainer(model=tiny_model_paths["student"], teacher_model=tiny_model_paths["teacher"],
                                args=TipDistillConfig(**_settings(tmp_path, "colocate", None)), train_dataset=prompts,
                                peft_config=lora)
    eos = build_tokenizer().eos_token_id
    prompt_ids = _prompt_ids(prompts)
    trainer.vllm_generation.sync_weights()
    before = _engine_greedy(trainer.vllm_generation, prompt_ids)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters far from their zero initialisation
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    trainer.vllm_generation.sync_weights()
    after = _engine_greedy(trainer.vllm_generation, prompt_ids)
    assert after != before
    assert_greedy_follows(trainer.model, prompt_ids, after, eos)
    _release(trainer)
