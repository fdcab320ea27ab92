"""Model cards and Hub publishing for trl_tip trainers.

[`TrlTipHubMixin`] sits in front of a TRL trainer class. TRL's own card (base model, trainer, framework versions,
citation) is kept; a section is appended that names the trl_tip method and its paper, the teacher, the dataset, the
method's key settings and the final metrics, and the card is tagged `trl` and `trl-tip`. A LoRA student can be pushed
as adapters (default) or merged into its base first (`merge_adapters=True`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from typing import Any

from accelerate.utils import is_peft_model
from huggingface_hub import ModelCard


HUB_TAGS = ("trl", "trl-tip")
# Training settings shown in every card, after the method's own.
COMMON_CARD_FIELDS = (
    "learning_rate",
    "lr_scheduler_type",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "max_completion_length",
    "temperature",
    "beta",
    "seed",
)
# Adapter files that must not be uploaded next to merged weights.
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of every numeric training metric (step counters and timings left out)."""
    skipped = {"epoch", "step", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second",
               "step_time", "learning_rate", "grad_norm", "num_tokens"}
    metrics: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key not in skipped and isinstance(value, (int, float)) and not isinstance(value, bool):
                if not (isinstance(value, float) and math.isnan(value)):
                    metrics[key] = value
    return metrics


def render_card_section(
    method: str,
    paper: dict,
    base_model: str | None,
    teacher: str | None,
    dataset: str | None,
    settings: dict[str, Any],
    metrics: dict[str, float],
) -> str:
    """The markdown section trl_tip appends to TRL's model card."""
    paper_title = paper.get("title")
    paper_id = paper.get("id")
    if paper_title and paper_id:
        paper_line = f"[{paper_title}](https://huggingface.co/papers/{paper_id})"
    else:
        paper_line = paper_title or "—"
    lines = [
        "",
        "## trl_tip",
        "",
        f"Trained with **{method}** from trl_tip (`pip install trl-tip`), a set of TRL trainers.",
        "",
        "| | |",
        "|---|---|",
        f"| method | {method} |",
        f"| paper | {paper_line} |",
        f"| base model | {base_model or '—'} |",
        f"| teacher | {teacher or '—'} |",
        f"| dataset | {dataset or '—'} |",
        "",
        "### Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| `{name}` | {_format_value(value)} |" for name, value in settings.items()),
    ]
    if metrics:
        lines += [
            "",
            "### Final metrics",
            "",
            "| metric | value |",
            "|---|---|",
            *(f"| `{name}` | {_format_value(value)} |" for name, value in sorted(metrics.items())),
        ]
    return "\n".join(lines) + "\n"


def lora_layers(peft_model, adapter_name: str) -> dict[str, tuple[float, bool]]:
    """
    `{module name: (scaling, fan_in_fan_out)}` of every LoRA layer of `adapter_name` in a PEFT model; these are module
    attributes, present on every rank even when the weights are sharded.
    """
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            if module.use_dora.get(adapter_name, False):
                raise ValueError(
                    f"merge_adapters=True merges plain LoRA; {name} uses DoRA. Push the adapters instead."
                )
            layers[name] = (float(module.scaling[adapter_name]), bool(getattr(module, "fan_in_fan_out", False)))
    if not layers:
        raise ValueError(f"The model has no LoRA linear layers of adapter {adapter_name!r} to merge.")
    return layers


def merge_lora_state_dict(
    state_dict: dict, layers: dict[str, tuple[float, bool]], adapter_name: str, prefix: str = "base_model.model."
) -> dict:
    """
    Merge LoRA adapters into their base weights in a (gathered) PEFT state dict, as PEFT's `merge_and_unload` does:
    W' = W + transpose(B·A, fan_in_fan_out) · scaling, per adapted layer; other adapters' weights are dropped, a
    `modules_to_save` copy replaces its original, and names lose PEFT's `prefix` and `.base_layer`.

    Args:
        state_dict (`dict`): the whole PEFT model's state dict (e.g. what ZeRO-3 or FSDP2 gather for saving).
        layers (`dict`): [`lora_layers`] of the model.
        adapter_name (`str`): the adapter to merge.
        prefix (`str`, *optional*, defaults to `"base_model.model."`): the PEFT wrapper's prefix to strip.

    Returns:
        `dict[str, torch.Tensor]`: the merged model's state dict, named as the base model names it.
    """
    import torch

    merged = {}
    for key, value in state_dict.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            if f".modules_to_save.{adapter_name}." not in key:
                continue
            key = key.replace(f".modules_to_save.{adapter_name}.", ".")
        merged[key.replace(".base_layer.", ".")] = value
    for name, (scaling, fan_in_fan_out) in layers.items():
        weight = state_dict[f"{name}.base_layer.weight"]
        lora_a = state_dict[f"{name}.lora_A.{adapter_name}.weight"]
        lora_b = state_dict[f"{name}.lora_B.{adapter_name}.weight"]
        # Float32 for 16-bit weights, wherever they are: PEFT does so on CPU (on GPU it multiplies in 16 bit, so a
        # merge there may differ from PEFT's by 16-bit rounding); the weights' own dtype otherwise.
        compute_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        delta = lora_b.to(compute_dtype) @ lora_a.to(compute_dtype)
        if fan_in_fan_out:
            delta = delta.T
        merged[f"{name}.weight"] = (weight + (delta * scaling).to(weight.dtype)).contiguous()
    return {key.removeprefix(prefix): value for key, value in merged.items()}


class TrlTipHubMixin:
    """
    Model-card and push behaviour shared by the trl_tip trainers; place it before the TRL trainer in the bases.

    Subclasses list the config fields that define their method in `_card_fields`; the teacher, when there is one, is
    read from `self.teacher_model` or `args.teacher_model_name_or_path`.
    """

    _card_fields: tuple[str, ...] = ()

    def _teacher_name(self) -> str | None:
        name = getattr(self.args, "teacher_model_name_or_path", None)
        teacher = getattr(self, "teacher_model", None)
        if name is None and teacher is not None:
            config = getattr(self.accelerator.unwrap_model(teacher), "config", None)
            name = getattr(config, "_name_or_path", None)
        return name or None

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        metrics: dict[str, float] | None = None,
    ):
        """
        TRL's model card, plus a trl_tip section (method, paper, teacher, dataset, key settings, final metrics) and the
        `trl` / `trl-tip` tags.

        Args:
            model_name (`str`, *optional*): name of the model.
            dataset_name (`str`, *optional*): dataset used for training.
            tags (`str` or `list[str]`, *optional*): extra tags.
            metrics (`dict[str, float]`, *optional*): metrics to report (e.g. test accuracy), added to the last
                logged training metrics.
        """
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        tags += [tag for tag in HUB_TAGS if tag not in tags]
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        card = ModelCard.load(path)
        base_model = getattr(self.accelerator.unwrap_model(self.model).config, "_name_or_path", None)
        settings = {name: getattr(self.args, name) for name in (*self._card_fields, *COMMON_CARD_FIELDS)
                    if hasattr(self.args, name)}
        card.text = card.text.rstrip("\n") + "\n" + render_card_section(
            method=self._name,
            paper=self._paper,
            base_model=base_model,
            teacher=self._teacher_name(),
            dataset=dataset_name,
            settings=settings,
            metrics={**final_metrics(self.state.log_history), **(metrics or {})},
        )
        card.data.tags = sorted(set(card.data.tags or []) | set(HUB_TAGS))
        card.save(path)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    merge_adapters: bool = False, **kwargs):
        """
        Upload the student, its tokenizer and the model card to `args.hub_model_id`.

        Args:
            commit_message (`str`, *optional*, defaults to `"End of training"`): commit message.
            blocking (`bool`, *optional*, defaults to `True`): wait for the upload to finish.
            merge_adapters (`bool`, *optional*, defaults to `False`): for a LoRA student, merge the adapters into the
                base weights and upload a plain model instead of adapter files. Needs an unquantised base.
            **kwargs: passed to [`~transformers.Trainer.push_to_hub`] and on to [`create_model_card`] (`dataset_name`,
                `tags`, `metrics`, `token`, `revision`, `private`).
        """
        context = self._merged_adapters() if merge_adapters else contextlib.nullcontext()
        with context:
            return super().push_to_hub(commit_message=commit_message, blocking=blocking, **kwargs)

    @contextlib.contextmanager
    def _merged_adapters(self):
        # Saving goes through `Trainer._save`, which writes `self.model`; for the length of the push, `_save` writes a
        # merged copy instead, so training can go on with the adapters afterwards.
        student = self.accelerator.unwrap_model(self.model)
        if not is_peft_model(student):
            raise ValueError("merge_adapters=True needs a PEFT (LoRA) student; this model has no adapters to merge.")
        if getattr(student, "is_loaded_in_4bit", False) or getattr(student, "is_loaded_in_8bit", False) or getattr(
            student.get_base_model(), "is_loaded_in_4bit", False
        ):
            raise ValueError(
                "merge_adapters=True needs an unquantised base: merging into 4-bit/8-bit weights loses precision. "
                "Push the adapters (merge_adapters=False), or reload the base in bf16, load the adapters and merge."
            )
        original_save = self._save

        def save_merged(output_dir: str | None = None, state_dict=None):
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            if state_dict is None:
                merged = copy.deepcopy(student).merge_and_unload()
                merged.save_pretrained(output_dir)
            else:
                # ZeRO-3 and FSDP2 (`FULL_STATE_DICT`) hand `_save` the state dict they gathered on the main
                # process; the local student holds shards only, so merge in the gathered tensors instead.
                adapter = student.active_adapters[0]
                merged_state = merge_lora_state_dict(state_dict, lora_layers(student, adapter), adapter)
                student.get_base_model().save_pretrained(output_dir, state_dict=merged_state)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            for name in _ADAPTER_FILES:
                stale = os.path.join(output_dir, name)
                if os.path.exists(stale):
                    os.remove(stale)

        self._save = save_merged
        try:
            yield
        finally:
            self._save = original_save
