"""Hub publishing, offline: the upload is captured instead of sent."""

import os
from types import SimpleNamespace

import pytest
import transformers.trainer
from huggingface_hub import ModelCard
from peft import LoraConfig

from trl_tip import TipDistillConfig, TipDistillTrainer
from trl_tip.hub import final_metrics, render_card_section
from builders import training_config


class CapturingHfApi:
    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=f"user/{repo_id.split('/')[-1]}")

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
        files = {}
        for name in sorted(os.listdir(folder_path)):
            path = os.path.join(folder_path, name)
            if os.path.isfile(path) and not name.startswith("_"):
                files[name] = open(path, "rb").read()
        self.uploads.append({"repo_id": repo_id, "files": files})
        return SimpleNamespace(commit_url="captured")


@pytest.fixture
def hub(monkeypatch):
    api = CapturingHfApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    return api


NUM_PROBLEMS = 8


def _trainer(paths, problems, tmp_path, peft_config=None):
    args = training_config(TipDistillConfig, tmp_path / "tip-student", per_device_train_batch_size=4, max_steps=1,
                           max_completion_length=8, token_ratio=0.2, hub_model_id="tip-student")
    trainer = TipDistillTrainer(model=paths["student"], teacher_model=paths["teacher"], args=args,
                                train_dataset=problems, peft_config=peft_config)
    trainer.train()
    return trainer


def test_push_uploads_the_student_and_a_card_naming_the_method(tiny_model_paths, problems, tmp_path, hub):
    trainer = _trainer(tiny_model_paths, problems, tmp_path)
    trainer.push_to_hub(dataset_name="builtin/arithmetic", metrics={"test_accuracy": 0.875})
    assert hub.uploads[0]["repo_id"] == "user/tip-student"
    files = hub.uploads[0]["files"]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert {"trl", "trl-tip", "tip", "distillation"} <= set(card.data.tags)
    text = card.text
    assert "TIP distillation" in text and "Token Importance in On-Policy Distillation" in text
    assert f"| teacher | {tiny_model_paths['teacher']} |" in text
    assert "| dataset | builtin/arithmetic |" in text
    assert "| `token_selection` | soft_or |" in text and "| `token_ratio` | 0.2 |" in text
    assert "| `test_accuracy` | 0.875 |" in text
    assert "| `loss` |" in text and "| `tip/kept_fraction` |" in text


def test_lora_student_pushed_as_adapters_or_merged(tiny_model_paths, problems, tmp_path, hub):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(tiny_model_paths, problems, tmp_path, peft_config=lora)
    trainer.push_to_hub()
    adapter_files = set(hub.uploads[-1]["files"])
    assert {"adapter_model.safetensors", "adapter_config.json"} <= adapter_files
    assert "model.safetensors" not in adapter_files

    trainer.push_to_hub(merge_adapters=True)
    merged_files = set(hub.uploads[-1]["files"])
    assert {"model.safetensors", "config.json", "README.md"} <= merged_files
    assert not merged_files & {"adapter_model.safetensors", "adapter_config.json"}
    # The trainer keeps its adapters after a merged push.
    assert any("lora_" in name for name, _ in trainer.model.named_parameters())


def test_merge_adapters_needs_adapters(tiny_model_paths, problems, tmp_path, hub):
    trainer = _trainer(tiny_model_paths, problems, tmp_path)
    with pytest.raises(ValueError, match="needs a PEFT"):
        trainer.push_to_hub(merge_adapters=True)


def test_card_helpers():
    history = [{"loss": 1.0, "epoch": 0.1}, {"loss": 0.5, "tip/kept_fraction": 0.5, "step": 2}, {"train_runtime": 3.0}]
    assert final_metrics(history) == {"loss": 0.5, "tip/kept_fraction": 0.5}
    text = render_card_section("M", {"title": "T", "id": "2401.00001"}, "base", None, None, {"x": 0.1}, {})
    assert "[T](https://huggingface.co/papers/2401.00001)" in text and "| teacher | — |" in text
    assert "Final metrics" not in text


def _lora_student(paths, fan_in_fan_out=False):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                      modules_to_save=["lm_head"], fan_in_fan_out=fan_in_fan_out)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(paths["student"]), lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter))  # B starts at zero: make the merge do something
    return model


def test_merged_state_dict_is_peft_merge_and_unload(tiny_model_paths):
    # The merge of a gathered state dict (what ZeRO-3 / FSDP2 hand `_save`) against PEFT's own merge.
    import copy

    import torch

    from trl_tip.hub import lora_layers, merge_lora_state_dict

    model = _lora_student(tiny_model_paths)
    layers = lora_layers(model, "default")
    assert all(scaling == 12 / 4 for scaling, _ in layers.values())
    merged = merge_lora_state_dict(model.state_dict(), layers, "default")
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for name, tensor in reference.items():
        # Same float32 operations in the same order: equal up to at most one rounding of the sum.
        tolerance = 2 * torch.finfo(torch.float32).eps * tensor.abs().max().item()
        assert torch.allclose(merged[name], tensor, rtol=0, atol=tolerance), name
    # The adapters moved the weights: the comparison is not trivially between two copies of the base.
    base = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base)


def test_push_merged_from_a_gathered_state_dict(tiny_model_paths, problems, tmp_path, hub):
    # Under ZeRO-3 / FSDP2 the trainer's `save_model` passes `_save` the gathered state dict; the merged upload is
    # built from it, not from the (sharded) local model, and loads as the merged student.
    import copy

    import torch
    from safetensors.torch import load_file

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _trainer(tiny_model_paths, problems, tmp_path, peft_config=lora)
    student = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.add_(1.0)
    gathered = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    with trainer._merged_adapters():
        trainer._save(str(tmp_path / "merged"), state_dict=gathered)
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    reference = copy.deepcopy(student).merge_and_unload().state_dict()
    assert set(saved) <= set(reference) and "model.layers.0.self_attn.q_proj.weight" in saved
    for name, tensor in saved.items():
        tolerance = 2 * torch.finfo(torch.float32).eps * reference[name].abs().max().item()
        assert torch.allclose(tensor, reference[name], rtol=0, atol=tolerance), name
