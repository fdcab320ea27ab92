"""
Every private TRL / accelerate name trl_tip relies on, in one place, and every assignment to a TRL module attribute.

TRL is pinned to one minor release (`trl>=1.16,<1.17`) because these names may change between releases. When a TRL
upgrade breaks one of them, the failure points here, and the comment above each entry says what depends on it.
`tests/test_trl_contract.py` pins each entry (and the signatures of the TRL methods the trainers override or call);
`docs/upgrading_trl.md` lists them with what to check on an upgrade.

Elsewhere the package uses TRL's public API, overrides TRL's methods, and reads attributes TRL's trainers set on
themselves (`self._metrics`, ...); it imports no private TRL name and assigns to no TRL or accelerate module attribute.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator

import trl.trainer.distillation_trainer as _distillation_module
from accelerate.state import AcceleratorState
from trl.kernels import chunked_divergence as _chunked_divergence_module
from trl.kernels.chunked_divergence import (
    ChunkedDivergenceFunction,
    _compute_dtype,
    _jsd_kernel,
    _jsd_tile,
    _project,
    _stats_kernel,
    _stats_tile,
)
from trl.kernels.chunked_logprob import _BLOCK_SIZE, _torch_transform, _use_triton
from trl.trainer.distillation_trainer import _chunked_divergence_loss



# ---- The chunked divergence kernel (trl.kernels.chunked_divergence, trl.kernels.chunked_logprob) ----
#
# `trl_tip.chunked_stats` walks the same `[tokens x vocabulary]` tiles as TRL's `ChunkedDivergenceFunction`, with TRL's
# own tile projection and statistics folds (Triton where TRL uses Triton, torch elsewhere), so its per-token entropy
# and divergences are TRL's bit for bit, and runs TRL's backward on the rows it keeps. None of these helpers is public
# in TRL 1.16.

# Width of the vocabulary blocks TRL's Triton kernels fold at once.
KERNEL_BLOCK_SIZE = _BLOCK_SIZE
# `compute_dtype(hidden)`: the dtype TRL projects a model's tiles in.
compute_dtype = _compute_dtype
# `project_tile(tile, hidden_chunk, weight, bias, start, end, dtype)`: fills `tile` with fp32 logits of rows
# `start:end` of the `lm_head`.
project_tile = _project
# The online-logsumexp statistics of a student and a teacher tile: Triton kernel (launched as `stats_kernel[(n,)]`)
# and its torch twin, with the same arguments.
stats_kernel = _stats_kernel
stats_tile = _stats_tile
# The second pass of the generalised JSD (0 < beta < 1), Triton and torch.
jsd_kernel = _jsd_kernel
jsd_tile = _jsd_tile
# `torch_transform(z, logit_scale, softcap, inv_t, HAS_SOFTCAP)`: TRL's logit post-processing of a tile, in torch.
torch_transform = _torch_transform
# `use_triton(device)`: whether TRL's kernels take their Triton path on `device` (they then score completion rows
# only; elsewhere every position, for fixed tile shapes).
use_triton = _use_triton
# TRL's generalised-JSD loss over hidden states, the one `DistillationTrainer._compute_loss` calls; the reference that
# `trl_tip.losses.selective_divergence_loss` (same positional arguments) reproduces with every token kept.
trl_chunked_divergence_loss = _chunked_divergence_loss

# What `ChunkedDivergenceFunction.forward` leaves on its autograd context for `ChunkedDivergenceFunction.backward`: the
# saved tensors, in order, and the attributes. `chunked_stats` computes the forward statistics itself and hands TRL's
# backward a context filled the same way (see `save_for_chunked_divergence_backward`).
CHUNKED_DIVERGENCE_SAVED_TENSORS = (
    "student_hidden",
    "student_weight",
    "student_bias",
    "teacher_hidden",
    "teacher_weight",
    "teacher_bias",
    "s_log_z",
    "t_log_z",
    "aux",
)
CHUNKED_DIVERGENCE_CTX_FIELDS = ("dtypes", "beta", "mode", "kernel_args")
# The keyword arguments TRL's forward hands its tile folds (and stores as `ctx.kernel_args` for the backward's).
CHUNKED_DIVERGENCE_KERNEL_ARGS = (
    "s_scale",
    "s_softcap",
    "t_scale",
    "t_softcap",
    "inv_t",
    "S_HAS_SOFTCAP",
    "T_HAS_SOFTCAP",
)


def save_for_chunked_divergence_backward(
    ctx,
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    student_log_z,
    teacher_log_z,
    aux,
    beta: float,
    kernel_args: dict,
) -> None:
    """
    Fill an autograd context as `ChunkedDivergenceFunction.forward` does, so that
    [`chunked_divergence_backward`] runs TRL's backward on it. `aux` is the divergence itself for beta in {0, 1}, else
    KL(student || mixture).
    """
    ctx.save_for_backward(
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        student_log_z,
        teacher_log_z,
        aux,
    )
    ctx.dtypes = compute_dtype(student_hidden), compute_dtype(teacher_hidden)
    ctx.beta = beta
    ctx.mode = 0 if beta == 0.0 else 1 if beta == 1.0 else 2
    ctx.kernel_args = kernel_args


def chunked_divergence_backward(ctx, grad_divergence):
    """
    TRL's chunked backward for a context filled by [`save_for_chunked_divergence_backward`]: `(grad_student_hidden,
    grad_student_weight, grad_student_bias)`, over the saved rows only.
    """
    grad_hidden, grad_weight, grad_bias, *_ = ChunkedDivergenceFunction.backward(ctx, grad_divergence, None)
    return grad_hidden, grad_weight, grad_bias


@contextlib.contextmanager
def tile_projection_wrapped(wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """
    While active, TRL's chunked divergence kernel projects its tiles through `wrap(project_tile)`. Used by the step
    profiler (`benchmarks/step_profile.py`) to time the teacher's `lm_head` projections inside TRL's forward; TRL's
    kernel looks `_project` up as a module global at call time, and offers no other hook.
    """
    original = _chunked_divergence_module._project
    _chunked_divergence_module._project = wrap(original)
    try:
        yield
    finally:
        _chunked_divergence_module._project = original


# ---- DistillationTrainer (trl.trainer.distillation_trainer) ----
#
# Two module globals that `DistillationTrainer` looks up at call time, with no method in between to override.


@contextlib.contextmanager
def divergence_loss_replaced_by(loss_fn: Callable) -> Iterator[None]:
    """
    While active, `DistillationTrainer._compute_loss` calls `loss_fn` (same arguments and return value as TRL's
    `_chunked_divergence_loss`) in place of TRL's loss.

    Why a patch: `_compute_loss` builds both models' hidden states, heads and logit post-processing (scale, softcap,
    temperature), then calls the module-level `_chunked_divergence_loss`. Swapping that one function for the length of
    one `_compute_loss` call is the narrowest hook TRL 1.16 offers between "hidden states" and "divergence"; overriding
    `_compute_loss` instead would copy its ~80 lines. Used by `TipDistillTrainer` / `PacedTrainer` (token selection,
    per-rollout weights) and `OPSDCTrainer` (per-rollout mean).
    """
    original = _distillation_module._chunked_divergence_loss
    _distillation_module._chunked_divergence_loss = loss_fn
    try:
        yield
    finally:
        _distillation_module._chunked_divergence_loss = original


@contextlib.contextmanager
def models_loaded_by_path_passed_to(on_load: Callable[[str, object], None]) -> Iterator[None]:
    """
    While active, every model `DistillationTrainer.__init__` loads from a path (student and teacher) is handed to
    `on_load(path, model)` as soon as it is loaded, before TRL checks it.

    Why a patch: `DistillationTrainer.__init__` loads the teacher with the module-level `create_model_from_path` and
    refuses, right after, a teacher whose config `vocab_size` differs from the student's. `TipDistillTrainer` (and
    `PacedTrainer`) distil heads padded to different sizes over one tokenizer, so the teacher's config must report the
    student's size during that check. Loading the teacher ahead of TRL would duplicate TRL's loading rules (dtype,
    revision, device map under DDP/DeepSpeed, `trust_remote_code`, quantisation).
    """
    load = _distillation_module.create_model_from_path

    def load_and_report(path, *args, **kwargs):
        model = load(path, *args, **kwargs)
        on_load(path, model)
        return model

    _distillation_module.create_model_from_path = load_and_report
    try:
        yield
    finally:
        _distillation_module.create_model_from_path = load


# ---- A teacher served by `trl vllm-serve` (trl.experimental.server_distillation) ----
#
# TRL 1.16's `ServerDistillationTrainer` builds its divergence on the teacher's top-k log-probs that a vLLM server
# returns. `trl_tip.sparse_divergence` computes the same divergence with the same helpers (module-level functions of
# the experimental module, private but for `build_teacher_request_inputs`), so that `TipDistillTrainer` with
# `token_selection="all"` and a served teacher is TRL's server loss.

# The module is imported on first use, not with trl_tip: `trl.experimental` warns on import that its APIs are
# unstable, which a user who never serves a teacher should not see (the seam is where that warning is accounted for).


def _server_distillation():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        from trl.experimental.server_distillation import server_distillation_trainer
    return server_distillation_trainer


def add_tail_bucket(log_probs, valid_mask):
    """TRL's `_add_tail_bucket`: appends log(1 − Σ exp(log_probs)) as a (K+1)-th element, and its mask."""
    return _server_distillation()._add_tail_bucket(log_probs, valid_mask)


def sparse_jsd(student_log_probs, teacher_log_probs, beta, support_mask):
    """
    TRL's `_jsd_divergence`: the elementwise generalised JSD (beta=0 forward KL, beta=1 reverse KL) on a masked sparse
    support; summed over the support it is one token's divergence.
    """
    return _server_distillation()._jsd_divergence(student_log_probs, teacher_log_probs, beta, support_mask)


def teacher_request_inputs(input_ids, attention_mask, prompt_attention_mask):
    """
    TRL's `build_teacher_request_inputs`: the unpadded sequences, prompt lengths and completion lengths that
    `VLLMClient.get_sequence_logprobs` is sent.
    """
    return _server_distillation().build_teacher_request_inputs(
        input_ids=input_ids, attention_mask=attention_mask, prompt_attention_mask=prompt_attention_mask
    )


# ---- vLLM on its CPU platform ----
#
# TRL's trainers build their vLLM backend inline in `__init__` from the module-level name `VLLMGeneration` of
# `trl.trainer.distillation_trainer` and `trl.trainer.grpo_trainer`; there is no method to override. On vLLM's CPU
# platform that backend cannot push weights (see `trl_tip.vllm_cpu`), so while a trl_tip trainer is constructed the
# name points to `CPUVLLMGeneration`, and is restored afterwards. On any other platform nothing is replaced.

_TRAINER_MODULES_BUILDING_VLLM = ("trl.trainer.distillation_trainer", "trl.trainer.grpo_trainer")


def vllm_runs_on_cpu() -> bool:
    """Whether vLLM is installed and runs on its CPU platform (the `vllm-cpu` build, or no accelerator)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return current_platform.is_cpu()


@contextlib.contextmanager
def platform_vllm_generation(args) -> Iterator[None]:
    """
    While a trainer is built with `args`: if it generates with vLLM (`args.use_vllm`) and vLLM runs on its CPU
    platform, TRL's trainers build [`~trl_tip.vllm_cpu.CPUVLLMGeneration`] instead of TRL's `VLLMGeneration`.
    """
    if not getattr(args, "use_vllm", False) or not vllm_runs_on_cpu():
        yield
        return
    from .vllm_cpu import CPUVLLMGeneration

    modules = [importlib.import_module(name) for name in _TRAINER_MODULES_BUILDING_VLLM]
    originals = [module.VLLMGeneration for module in modules]
    for module in modules:
        module.VLLMGeneration = CPUVLLMGeneration
    try:
        yield
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.VLLMGeneration = original


def iter_vllm_weights(vllm_generation):
    """
    `(name, tensor)` of the training model under the names vLLM loads, one parameter at a time; PEFT adapters merged
    for the duration of the iteration. TRL's private `VLLMGeneration._iter_named_params`, which its own weight sync
    uses, so both paths push the same tensors under the same names.
    """
    return vllm_generation._iter_named_params()


def mark_vllm_weights_awake(vllm_generation) -> None:
    """
    Record on a `VLLMGeneration` that its colocated engine holds weights (is not asleep). TRL's `_init_vllm` sets the
    private flag `_llm_weights_sleeping` that `generate` reads; `CPUVLLMGeneration._init_vllm` builds the engine
    itself (never in sleep mode), so it sets the flag too.
    """
    vllm_generation._llm_weights_sleeping = False


# ---- accelerate ----


def reset_accelerator_state() -> None:
    """
    Forget accelerate's process-wide `AcceleratorState`, so that a second `Accelerator` may be built with a DeepSpeed
    plugin in the same process (`trl_tip.script_utils.reset_for_another_trainer`). accelerate's private
    `AcceleratorState._reset_state()`, which transformers' hyperparameter search calls between trials too.
    """
    AcceleratorState._reset_state()

