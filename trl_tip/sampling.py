"""
Sampling for evaluation: `n` completions per prompt, with transformers' `generate` ([`sample_completions`]) or vLLM
([`load_vllm_engine`], [`sample_completions_vllm`]). [`trl_tip.evaluation`] grades and aggregates them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def tokenize_prompts(tokenizer, prompts: Sequence, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Conversational prompts through the chat template (generation prompt added), as token ids."""
    ids = []
    for prompt in prompts:
        if isinstance(prompt, str):
            raise TypeError(
                "Prompts must be chat messages (a list of {'role', 'content'}); wrap plain text in a user turn."
            )
        encoded = tokenizer.apply_chat_template(
            list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True, **(chat_template_kwargs or {})
        )
        ids.append(list(encoded["input_ids"]))
    return ids


def _eos_token_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    if not ids:
        raise ValueError("Neither the tokenizer nor the model's generation config names an end-of-sequence token.")
    return sorted(ids)


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 64,
) -> tuple[list[str], list[int]]:
    """
    Sample `num_samples` completions for each prompt with transformers' `generate` (from the global random state).

    Returns:
        `tuple[list[str], list[int]]`: the decoded completions, sample `i` of prompt `p` at index
        `p * num_samples + i`, and the number of tokens each one generated, its end-of-sequence token included
        (`max_new_tokens` for a completion cut at the budget).
    """
    from transformers import GenerationConfig

    eos = _eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # Temperature 0 is greedy decoding, as in vLLM (transformers would divide the logits by it).
    greedy = temperature == 0
    config = GenerationConfig(
        do_sample=not greedy,
        temperature=1.0 if greedy else temperature,
        top_p=1.0 if greedy else top_p,
        top_k=top_k,  # 0: no top-k filtering, whatever the model's generation config says
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    repeated = [ids for ids in prompt_ids for _ in range(num_samples)]
    was_training = model.training
    model.eval()
    texts, counts = [], []
    try:
        for start in range(0, len(repeated), batch_size):
            batch = repeated[start : start + batch_size]
            width = max(map(len, batch))
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=model.device)
            attention_mask = torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=model.device
            )
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            generated = output[:, width:].cpu()
            is_eos = torch.isin(generated, torch.tensor(eos))
            lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, generated.size(1)).tolist()
            rows = [row[:length] for row, length in zip(generated.tolist(), lengths, strict=True)]
            texts += tokenizer.batch_decode(rows, skip_special_tokens=True)
            counts += lengths
    finally:
        model.train(was_training)
    return texts, counts


def _import_vllm():
    try:
        from vllm import LLM, SamplingParams
    except ImportError as error:
        raise ImportError(
            "The vllm backend needs vLLM, which is not installed (or failed to import: "
            f"{error}). Install it with `pip install 'trl-tip[vllm]'` on a Linux machine with a CUDA GPU, or use "
            "--backend transformers."
        ) from error
    return LLM, SamplingParams


def load_vllm_engine(
    model_path: str,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    dtype: str = "auto",
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
    enforce_eager: bool = False,
):
    """
    A `vllm.LLM` engine for `model_path`; raises `ImportError` with install instructions when vLLM is missing.
    `dtype="auto"` is vLLM's choice, which runs a float32 checkpoint in the platform's half precision (bfloat16 on
    CPUs and recent GPUs); `enforce_eager` skips compiling the model (CUDA graphs, or torch.compile on vLLM's CPU
    build). On vLLM's CPU build the KV cache gets
    `VLLM_CPU_KVCACHE_SPACE` GiB, 1 when unset.
    """
    LLM, _ = _import_vllm()
    from ._trl_compat import vllm_runs_on_cpu

    if vllm_runs_on_cpu():
        from .vllm_cpu import ensure_cpu_kv_cache_space

        ensure_cpu_kv_cache_space()
        cpu_kwargs = {"enable_chunked_prefill": False}
    else:
        cpu_kwargs = {}
    engine_kwargs = {
        **cpu_kwargs,
        "model": model_path,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "dtype": dtype,
        "seed": seed,
        "trust_remote_code": trust_remote_code,
        "enforce_eager": enforce_eager,
    }
    if max_model_len is not None:
        engine_kwargs["max_model_len"] = max_model_len
    return LLM(**engine_kwargs)


def sample_completions_vllm(
    llm,
    prompt_ids: list[list[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> tuple[list[str], list[int]]:
    """
    Sample `num_samples` completions for each prompt with a `vllm.LLM` engine: one `generate` call on the prompts'
    token ids, prompt `p` with `SamplingParams(n=num_samples, seed=seed + p * num_samples, ...)`, so that a run is
    reproducible whatever else the engine generated before.

    Returns:
        Like [`sample_completions`]: the texts (sample `i` of prompt `p` at `p * num_samples + i`) and the generated
        token counts (vLLM's output token ids, its end-of-sequence token included).
    """
    _, SamplingParams = _import_vllm()
    params = [
        SamplingParams(
            n=num_samples,
            temperature=temperature,
            top_p=top_p,
            top_k=-1 if top_k == 0 else top_k,  # vLLM spells "no top-k" as -1
            max_tokens=max_new_tokens,
            seed=seed + p * num_samples,
        )
        for p in range(len(prompt_ids))
    ]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params=params)
    if len(outputs) != len(prompt_ids) or any(len(output.outputs) != num_samples for output in outputs):
        raise RuntimeError(
            f"vLLM returned {[len(output.outputs) for output in outputs]} completions for {len(prompt_ids)} prompts; "
            f"expected {num_samples} each."
        )
    texts = [sample.text for output in outputs for sample in output.outputs]
    counts = [len(sample.token_ids) for output in outputs for sample in output.outputs]
    return texts, counts
