"""
The contract between trl_tip and the installed TRL (and accelerate): every private name `trl_tip/_trl_compat.py`
imports or patches, the signatures of the TRL methods the trainers override or call, and the details of TRL's code
they rely on. Each failure says which TRL change broke which trainer; docs/upgrading_trl.md lists the same points.

The TRL modules are inspected directly (not through the seam), so that a missing name fails here with its own message
rather than as an import error of trl_tip.
"""

import ast
import importlib
import inspect
import textwrap
import types

import pytest


def broken(trl_name: str, relied_on_by: str, detail: str) -> str:
    library = next((name for name in ("accelerate", "transformers") if trl_name.startswith(name)), "TRL")
    return (
        f"The installed {library} changed `{trl_name.replace(':', '.')}`, which {relied_on_by} relies on: {detail}. "
        "See docs/upgrading_trl.md for what to check, and trl_tip/_trl_compat.py for the seam."
    )


def resolve(path: str):
    """`"module:Qualified.name"` -> the object."""
    module_name, _, qualname = path.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split(".") if qualname else []:
        obj = getattr(obj, part)
    return obj


def names_used(func) -> set[str]:
    """Global and attribute names a function's code (nested functions included) refers to."""
    names, stack = set(), [inspect.unwrap(func).__code__]
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
    return names


def strings_used(func) -> set[str]:
    """String literals of a function's source (the dictionary keys it reads and writes among them)."""
    return {
        node.value
        for node in ast.walk(function_ast(func))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def function_ast(func) -> ast.FunctionDef:
    return ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(func)))).body[0]


def find_node(func, predicate, trl_name: str, relied_on_by: str, detail: str):
    """The first node of `func`'s syntax tree that satisfies `predicate`; fails with `detail` when there is none."""
    node = next((node for node in ast.walk(function_ast(func)) if predicate(node)), None)
    if node is None:
        pytest.fail(broken(trl_name, relied_on_by, detail))
    return node


def self_attributes_assigned(cls) -> set[str]:
    """`self.<name> = ...` anywhere in the class's own source and its TRL base classes'."""
    assigned = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("trl."):
            continue
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(klass)))):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                if isinstance(target, ast.Attribute) and getattr(target.value, "id", None) == "self":
                    assigned.add(target.attr)
    return assigned


# ---- Private names the seam imports ----

SEAM_IMPORTS = [
    ("trl.kernels.chunked_logprob:_BLOCK_SIZE", "chunked_stats (TIP/PACED token statistics)"),
    ("trl.kernels.chunked_logprob:_torch_transform", "chunked_stats.student_entropy"),
    ("trl.kernels.chunked_logprob:_use_triton", "chunked_stats and losses.selective_divergence_loss"),
    ("trl.kernels.chunked_divergence:_compute_dtype", "chunked_stats"),
    ("trl.kernels.chunked_divergence:_project", "chunked_stats (tile projection)"),
    ("trl.kernels.chunked_divergence:_stats_kernel", "chunked_stats.token_stats on Triton devices"),
    ("trl.kernels.chunked_divergence:_stats_tile", "chunked_stats.token_stats on CPU"),
    ("trl.kernels.chunked_divergence:_jsd_kernel", "chunked_stats (0 < beta < 1, selection_divergence='jsd')"),
    ("trl.kernels.chunked_divergence:_jsd_tile", "chunked_stats (0 < beta < 1, selection_divergence='jsd')"),
    ("trl.kernels.chunked_divergence:ChunkedDivergenceFunction.backward", "chunked_stats.divergence_from_stats"),
    ("trl.kernels.chunked_divergence:TOKEN_CHUNK_SIZE", "chunked_stats"),
    ("trl.kernels.chunked_divergence:VOCAB_CHUNK_SIZE", "chunked_stats"),
    ("trl.trainer.distillation_trainer:_chunked_divergence_loss", "TipDistillTrainer, PacedTrainer and OPSDCTrainer"),
    ("trl.trainer.distillation_trainer:create_model_from_path", "TipDistillTrainer (teacher heads of another size)"),
    ("trl.trainer.distillation_trainer:VLLMGeneration", "every distillation trainer on vLLM's CPU platform"),
    ("trl.trainer.grpo_trainer:VLLMGeneration", "ACEGRPOTrainer on vLLM's CPU platform"),
    ("trl.generation.vllm_generation:VLLMGeneration._iter_named_params", "CPUVLLMGeneration.sync_weights"),
    ("trl.experimental.server_distillation.server_distillation_trainer:_add_tail_bucket",
     "sparse_divergence (TIP and PACED with a served teacher)"),
    ("trl.experimental.server_distillation.server_distillation_trainer:_jsd_divergence",
     "sparse_divergence (TIP and PACED with a served teacher)"),
    ("trl.experimental.server_distillation.server_distillation_trainer:build_teacher_request_inputs",
     "served_teacher (requests to the teacher server)"),
    ("accelerate.state:AcceleratorState._reset_state", "script_utils.reset_for_another_trainer (DeepSpeed)"),
    ("accelerate.state:is_initialized", "script_utils.reset_for_another_trainer"),
]


@pytest.mark.parametrize(("path", "relied_on_by"), SEAM_IMPORTS, ids=[path for path, _ in SEAM_IMPORTS])
def test_the_private_names_the_seam_imports_exist(path, relied_on_by):
    try:
        resolve(path)
    except (ImportError, AttributeError) as error:
        pytest.fail(broken(path, relied_on_by, f"it no longer exists ({error})"))


def test_the_seam_imports():
    # If this fails while the test above passes, the seam itself is broken, not TRL.
    from trl_tip import _trl_compat  # noqa: F401


# ---- Signatures of the TRL methods the trainers override or call ----

# (TRL callable, its parameters in order as trl_tip relies on them, who relies on them). A leading "..." compares only
# the parameter names given (for calls by keyword); otherwise the list is the signature's leading parameters, in order.
SIGNATURES = [
    # DistillationTrainer hooks (TipDistillTrainer, PacedTrainer, OPSDCTrainer)
    ("trl:DistillationTrainer.__init__", ["self", "model", "teacher_model", "args", "train_dataset", "eval_dataset",
                                          "processing_class", "callbacks", "optimizers", "quantization_config",
                                          "peft_config", "tools"], "the distillation trainers' constructors"),
    ("trl:DistillationTrainer._compute_loss", ["self", "unwrapped_student", "inputs", "num_items_in_batch"],
     "TipDistillTrainer, PacedTrainer and OPSDCTrainer (override)"),
    ("trl:DistillationTrainer.compute_loss", ["self", "model", "inputs", "return_outputs", "num_items_in_batch"],
     "TipDistillTrainer.compute_loss (override)"),
    ("trl:DistillationTrainer._generate_and_score_completions", ["self", "inputs"],
     "TipDistillTrainer, PacedTrainer and OPSDCTrainer (override)"),
    ("trl:DistillationTrainer._get_last_hidden_state", ["self", "unwrapped_model", "input_ids", "attention_mask",
                                                        "logits_to_keep"],
     "PacedTrainer and OPSDCTrainer (override: the teacher reads its own prompt)"),
    ("trl:DistillationTrainer._generate_single_turn", ["self", "prompt_ids", "images", "multimodal_fields",
                                                       "has_tool_images"],
     "PacedTrainer (override: teacher-written completions; and called for pass-rate rollouts)"),
    ("trl:DistillationTrainer._prepare_inputs", ["self", "generation_batch"], "PacedTrainer (override)"),
    ("trl:DistillationTrainer._set_signature_columns_if_needed", ["self"], "PacedTrainer (override)"),
    ("trl:DistillationTrainer._tokenize_prompts", ["self", "prompts"], "PacedTrainer and OPSDCTrainer (called)"),
    ("trl:DistillationTrainer.training_step", ["self", "model", "inputs", "num_items_in_batch"],
     "PacedTrainer (override)"),
    ("trl:DistillationTrainer._get_train_sampler", ["self", "dataset"], "ResumableTrainerMixin (override)"),
    # GRPOTrainer hooks (ACEGRPOTrainer)
    ("trl:GRPOTrainer.__init__", ["self", "model", "reward_funcs", "args", "train_dataset", "eval_dataset",
                                  "processing_class", "reward_processing_classes", "callbacks", "optimizers",
                                  "quantization_config", "peft_config", "tools", "rollout_func",
                                  "environment_factory"], "ACEGRPOTrainer's constructor"),
    ("trl:GRPOTrainer._compute_loss", ["self", "model", "inputs"], "ACEGRPOTrainer (override)"),
    ("trl:GRPOTrainer._generate_and_score_completions", ["self", "inputs"], "ACEGRPOTrainer (override)"),
    ("trl:GRPOTrainer._get_per_token_logps_and_entropies", ["self", "model", "input_ids", "attention_mask",
                                                            "logits_to_keep"],
     "ACEGRPOTrainer (override, and called positionally for the reference log-probabilities)"),
    ("trl:GRPOTrainer._get_per_token_logps_and_entropies", ["...", "batch_size", "pixel_values", "image_grid_thw",
                                                            "num_images", "pixel_attention_mask", "spatial_shapes",
                                                            "num_tiles", "image_sizes", "token_type_ids",
                                                            "mm_token_type_ids", "image_position_ids"],
     "ACEGRPOTrainer._completion_logps (called by keyword)"),
    ("trl:GRPOTrainer._get_train_sampler", ["self", "dataset"], "ResumableTrainerMixin (override)"),
    # VLLMGeneration (CPUVLLMGeneration, PacedTrainer's pass-rate rollouts)
    ("trl.generation.vllm_generation:VLLMGeneration._init_vllm", ["self"], "CPUVLLMGeneration (override)"),
    ("trl.generation.vllm_generation:VLLMGeneration.sync_weights", ["self"], "CPUVLLMGeneration (override)"),
    ("trl.generation.vllm_generation:VLLMGeneration._iter_named_params", ["self"], "CPUVLLMGeneration.sync_weights"),
    ("trl.generation.vllm_generation:VLLMGeneration.generate", ["...", "prompts", "images", "num_generations"],
     "PacedTrainer._sample_student_completions (called by keyword)"),
    # The chunked divergence kernel (chunked_stats)
    ("trl.kernels.chunked_divergence:ChunkedDivergenceFunction.backward", ["ctx", "grad_divergence", "_"],
     "chunked_stats.divergence_from_stats (TRL's backward on a context trl_tip fills)"),
    ("trl.kernels.chunked_divergence:ChunkedDivergenceFunction.forward", [
        "ctx", "student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias",
        "beta", "temperature", "student_logit_scale", "student_final_logit_softcapping", "teacher_logit_scale",
        "teacher_final_logit_softcapping"], "chunked_stats (12 inputs: the backward returns 12 gradients)"),
    ("trl.kernels.chunked_divergence:_project", ["tile", "hidden_chunk", "weight", "bias", "start", "end", "dtype"],
     "chunked_stats (tile projection)"),
    ("trl.kernels.chunked_divergence:_compute_dtype", ["hidden"], "chunked_stats"),
    ("trl.kernels.chunked_divergence:_stats_tile", [
        "s_tile", "s_stride", "t_tile", "t_stride", "s_max", "s_sum", "s_x_sum", "t_max", "t_sum", "t_weighted_gap",
        "s_weighted_gap", "n_cols", "s_scale", "s_softcap", "t_scale", "t_softcap", "inv_t", "S_HAS_SOFTCAP",
        "T_HAS_SOFTCAP", "BLOCK_SIZE"], "chunked_stats.token_stats (called positionally)"),
    ("trl.kernels.chunked_divergence:_jsd_tile", [
        "s_tile", "s_stride", "t_tile", "t_stride", "s_log_z", "t_log_z", "jsd", "kl_student", "n_cols", "beta",
        "s_scale", "s_softcap", "t_scale", "t_softcap", "inv_t", "S_HAS_SOFTCAP", "T_HAS_SOFTCAP", "BLOCK_SIZE"],
     "chunked_stats (second pass of the JSD, called positionally)"),
    ("trl.kernels.chunked_logprob:_torch_transform", ["z", "logit_scale", "softcap", "inv_t", "HAS_SOFTCAP"],
     "chunked_stats.student_entropy"),
    ("trl.kernels.chunked_logprob:_use_triton", ["device"], "chunked_stats and losses"),
    ("trl.trainer.distillation_trainer:_chunked_divergence_loss", [
        "student_hidden_states", "teacher_hidden_states", "student_lm_head_weight", "teacher_lm_head_weight",
        "completion_mask", "beta", "num_items_in_batch", "student_lm_head_bias", "teacher_lm_head_bias",
        "student_logit_scale", "teacher_logit_scale", "student_final_logit_softcapping",
        "teacher_final_logit_softcapping", "temperature"],
     "losses.selective_divergence_loss, which stands in for it with the same positional arguments"),
    # A served teacher (sparse_divergence, served_teacher)
    ("trl.experimental.server_distillation.server_distillation_trainer:_add_tail_bucket",
     ["log_probs", "valid_mask"], "sparse_divergence (called positionally)"),
    ("trl.experimental.server_distillation.server_distillation_trainer:_jsd_divergence",
     ["student_log_probs", "teacher_log_probs", "beta", "support_mask"], "sparse_divergence (called positionally)"),
    ("trl.experimental.server_distillation.server_distillation_trainer:build_teacher_request_inputs",
     ["input_ids", "attention_mask", "prompt_attention_mask"], "served_teacher (called by keyword)"),
    ("trl.generation.vllm_client:VLLMClient.get_sequence_logprobs",
     ["self", "sequences", "prompt_lengths", "top_logprobs", "temperature"], "served_teacher (called by keyword)"),
    ("trl.generation.vllm_client:VLLMClient.generate",
     ["...", "prompts", "n", "repetition_penalty", "temperature", "top_p", "top_k", "min_p", "max_tokens",
      "generation_kwargs"], "served_teacher (PACED's teacher-written completions, called by keyword)"),
    # transformers' Trainer hooks (all four trainers)
    ("transformers:Trainer._save_rng_state", ["self", "output_dir"], "TipDistillTrainer (override)"),
    ("transformers:Trainer._load_rng_state", ["self", "checkpoint"], "TipDistillTrainer (override)"),
    ("transformers:Trainer._save", ["self", "output_dir", "state_dict"], "OPSDCTrainer (override)"),
    ("transformers:Trainer._save_optimizer_and_scheduler", ["self", "output_dir"], "OPSDCTrainer (override)"),
    ("transformers:Trainer._load_optimizer_and_scheduler", ["self", "checkpoint"],
     "OPSDCTrainer and PacedTrainer (override)"),
    ("transformers:Trainer.create_scheduler", ["self", "num_training_steps", "optimizer"],
     "PacedTrainer (override: the schedule is held on skipped steps)"),
]


@pytest.mark.parametrize(("path", "expected", "relied_on_by"), SIGNATURES,
                         ids=[f"{path}[{i}]" for i, (path, _, _) in enumerate(SIGNATURES)])
def test_the_signatures_trl_tip_overrides_or_calls(path, expected, relied_on_by):
    try:
        parameters = list(inspect.signature(resolve(path)).parameters)
    except (ImportError, AttributeError) as error:
        pytest.fail(broken(path, relied_on_by, f"it no longer exists ({error})"))
    if expected[0] == "...":
        missing = [name for name in expected[1:] if name not in parameters]
        assert not missing, broken(path, relied_on_by, f"it no longer takes {missing}; its parameters: {parameters}")
    else:
        assert parameters[: len(expected)] == expected, broken(
            path, relied_on_by, f"its parameters were {expected}, now {parameters}"
        )


def test_selective_divergence_loss_takes_trls_loss_arguments():
    # TipDistillTrainer's `_selective_divergence_loss` and OPSDC's per-rollout loss are called by TRL's
    # `DistillationTrainer._compute_loss` in place of `_chunked_divergence_loss`, with TRL's arguments.
    from trl.trainer.distillation_trainer import DistillationTrainer

    from trl_tip.losses import selective_divergence_loss

    call = find_node(
        DistillationTrainer._compute_loss,
        lambda node: isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_chunked_divergence_loss",
        "DistillationTrainer._compute_loss",
        "losses.selective_divergence_loss (TipDistillTrainer, PacedTrainer, OPSDCTrainer)",
        "it no longer calls `_chunked_divergence_loss`, which trl_tip's losses stand in for",
    )
    ours = inspect.signature(selective_divergence_loss).parameters
    positional = [name for name, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    keywords = [keyword.arg for keyword in call.keywords]
    unknown = [name for name in keywords if name not in ours]
    assert len(call.args) <= len(positional) and not unknown, broken(
        "DistillationTrainer._compute_loss",
        "losses.selective_divergence_loss (TipDistillTrainer, PacedTrainer, OPSDCTrainer)",
        f"it now calls `_chunked_divergence_loss` with {len(call.args)} positional arguments and the keywords "
        f"{keywords}; trl_tip's stand-in does not take {unknown or 'that many positional arguments'}",
    )


# ---- What TRL's code does that the trainers rely on ----


def test_distillation_compute_loss_calls_the_module_level_divergence_loss():
    from trl.trainer.distillation_trainer import DistillationTrainer

    assert "_chunked_divergence_loss" in names_used(DistillationTrainer._compute_loss), broken(
        "DistillationTrainer._compute_loss",
        "TipDistillTrainer, PacedTrainer and OPSDCTrainer (`divergence_loss_replaced_by`)",
        "it no longer calls the module-level `_chunked_divergence_loss`, so swapping that function no longer changes "
        "the loss: token selection, PACED weights and OPSDC's per-rollout mean would silently train TRL's plain loss",
    )
    # ... and unpacks (loss, entropy_sum, n_valid) from it, which the stand-ins return.
    assign = find_node(
        DistillationTrainer._compute_loss,
        lambda node: isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
        and getattr(node.value.func, "id", None) == "_chunked_divergence_loss",
        "DistillationTrainer._compute_loss",
        "the stand-in losses of TipDistillTrainer, PacedTrainer and OPSDCTrainer",
        "it no longer assigns the result of `_chunked_divergence_loss`",
    )
    target = assign.targets[0]
    assert isinstance(target, ast.Tuple) and len(target.elts) == 3, broken(
        "DistillationTrainer._compute_loss",
        "the stand-in losses of TipDistillTrainer, PacedTrainer and OPSDCTrainer",
        "it no longer unpacks three values (loss, entropy_sum, n_valid) from `_chunked_divergence_loss`",
    )


def test_distillation_init_loads_models_through_the_module_level_loader():
    from trl.trainer.distillation_trainer import DistillationTrainer

    used = names_used(DistillationTrainer.__init__)
    assert "create_model_from_path" in used, broken(
        "DistillationTrainer.__init__",
        "TipDistillTrainer (`models_loaded_by_path_passed_to`, teachers whose head is padded to another size)",
        "it no longer loads models with the module-level `create_model_from_path`, so a teacher given by path is not "
        "marked before TRL's vocab_size check",
    )


def test_distillation_trainer_sets_the_attributes_the_trainers_read():
    from trl.trainer.distillation_trainer import DistillationTrainer

    assigned = self_attributes_assigned(DistillationTrainer)
    read = {
        "_metrics": "every trainer's metrics (`self._metrics[mode][name]`)",
        "_step": "PacedTrainer._prepare_inputs (when a step generates)",
        "_buffered_inputs": "PacedTrainer._prepare_inputs (when a step generates)",
        "_is_vlm": "OPSDCTrainer (refuses vision-language models)",
        "_last_loaded_step": "PacedTrainer (vLLM weight sync before pass-rate rollouts)",
        "vllm_generation": "TipDistillTrainer and PacedTrainer",
        "teacher_model": "every distillation trainer",
        "generation_kwargs": "TipDistillTrainer (suppressed padding rows)",
        "generation_config": "TipDistillTrainer and PacedTrainer",
    }
    for name, who in read.items():
        assert name in assigned, broken("DistillationTrainer", who, f"it no longer sets `self.{name}`")
    returns = [node.value for node in ast.walk(function_ast(DistillationTrainer._tokenize_prompts))
               if isinstance(node, ast.Return)]
    assert returns and all(isinstance(value, ast.Tuple) and len(value.elts) == 3 for value in returns), broken(
        "DistillationTrainer._tokenize_prompts", "PacedTrainer and OPSDCTrainer (teacher prompts, pass-rate rollouts)",
        "it no longer returns (prompt_ids, images, multimodal_fields)",
    )
    prepare = names_used(DistillationTrainer._prepare_inputs)
    assert {"_step", "_buffered_inputs"} <= prepare, broken(
        "DistillationTrainer._prepare_inputs",
        "PacedTrainer._prepare_inputs (draws problems on the steps that generate)",
        "it no longer decides to generate from `self._step` and `self._buffered_inputs`",
    )


def test_distillation_generation_batch_keys():
    from trl.trainer.distillation_trainer import DistillationTrainer

    keys = strings_used(DistillationTrainer._generate_and_score_completions)
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "num_items_in_batch"):
        assert key in keys, broken(
            "DistillationTrainer._generate_and_score_completions",
            "TipDistillTrainer, PacedTrainer and OPSDCTrainer (they read and extend its output)",
            f"its output no longer has the key {key!r}",
        )
    assert "num_items_in_batch" in strings_used(DistillationTrainer.compute_loss), broken(
        "DistillationTrainer.compute_loss",
        "TipDistillTrainer (kept-token normaliser written into inputs['num_items_in_batch'])",
        "it no longer reads `inputs['num_items_in_batch']`",
    )


def test_grpo_loss_takes_log_probabilities_before_it_reads_the_advantages():
    # ACE scales the advantages of a micro-batch from the log-probabilities TRL's loss computes first; this needs the
    # `_get_per_token_logps_and_entropies` call to come before `inputs["advantages"]` is read.
    from trl import GRPOTrainer

    tree = function_ast(GRPOTrainer._compute_loss)
    calls = [
        node.lineno for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "_get_per_token_logps_and_entropies"
    ]
    reads = [
        node.lineno for node in ast.walk(tree)
        if isinstance(node, ast.Subscript) and getattr(node.slice, "value", None) == "advantages"
    ]
    assert calls and reads and min(calls) < min(reads), broken(
        "GRPOTrainer._compute_loss",
        "ACEGRPOTrainer (advantages scaled from the loss's own log-probabilities)",
        "it no longer calls `self._get_per_token_logps_and_entropies` before reading `inputs['advantages']`",
    )
    source = inspect.getsource(GRPOTrainer._compute_loss)
    assert "per_token_logps.detach() if old_per_token_logps is None" in source, broken(
        "GRPOTrainer._compute_loss",
        "ACEGRPOTrainer (the confidence shift measured on TRL's pi_old)",
        "it no longer takes the detached log-probabilities of its own forward as pi_old when the batch has no "
        "`old_per_token_logps`",
    )


def test_grpo_generation_batch_keys_and_reference_model():
    from trl import GRPOTrainer

    keys = strings_used(GRPOTrainer._generate_and_score_completions)
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
                "old_per_token_logps", "ref_per_token_logps"):
        assert key in keys, broken(
            "GRPOTrainer._generate_and_score_completions",
            "ACEGRPOTrainer (reads and rescales its output)",
            f"its output no longer has the key {key!r}",
        )
    assigned = self_attributes_assigned(GRPOTrainer)
    for name in ("_metrics", "ref_model", "beta"):
        assert name in assigned, broken("GRPOTrainer", "ACEGRPOTrainer", f"it no longer sets `self.{name}`")
    assert "ref_model" in names_used(GRPOTrainer.__init__) and "beta" in names_used(GRPOTrainer.__init__), broken(
        "GRPOTrainer.__init__",
        "ACEGRPOTrainer (builds the reference model by constructing with beta != 0)",
        "it no longer decides from `beta` whether to build `self.ref_model`",
    )


# ---- The chunked kernel's autograd context ----


def _ctx_attributes(func, stored: bool) -> set[str]:
    kind = ast.Store if stored else ast.Load
    return {
        node.attr for node in ast.walk(function_ast(func))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ctx"
        and isinstance(node.ctx, kind)
    }


def test_chunked_divergence_backward_reads_the_context_trl_tip_fills():
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    from trl_tip._trl_compat import CHUNKED_DIVERGENCE_CTX_FIELDS, CHUNKED_DIVERGENCE_SAVED_TENSORS

    who = "chunked_stats.divergence_from_stats (TIP's backward over kept tokens)"
    read = _ctx_attributes(ChunkedDivergenceFunction.backward, stored=False) - {"saved_tensors", "needs_input_grad"}
    assert read <= set(CHUNKED_DIVERGENCE_CTX_FIELDS), broken(
        "ChunkedDivergenceFunction.backward", who,
        f"it now reads ctx fields {sorted(read - set(CHUNKED_DIVERGENCE_CTX_FIELDS))} that trl_tip does not set",
    )
    stored = _ctx_attributes(ChunkedDivergenceFunction.forward, stored=True)
    assert stored == set(CHUNKED_DIVERGENCE_CTX_FIELDS), broken(
        "ChunkedDivergenceFunction.forward", who,
        f"its forward now sets ctx fields {sorted(stored)}, trl_tip sets {sorted(CHUNKED_DIVERGENCE_CTX_FIELDS)}",
    )
    unpack = find_node(
        ChunkedDivergenceFunction.backward,
        lambda node: isinstance(node, ast.Assign) and getattr(node.value, "attr", None) == "saved_tensors",
        "ChunkedDivergenceFunction.backward", who, "it no longer unpacks `ctx.saved_tensors`",
    )
    saved = tuple(element.id for element in unpack.targets[0].elts)
    assert saved == CHUNKED_DIVERGENCE_SAVED_TENSORS, broken(
        "ChunkedDivergenceFunction.backward", who,
        f"it now unpacks the saved tensors as {saved}, trl_tip saves {CHUNKED_DIVERGENCE_SAVED_TENSORS}",
    )


def test_chunked_divergence_kernel_arguments():
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    from trl_tip._trl_compat import CHUNKED_DIVERGENCE_KERNEL_ARGS
    from trl_tip.chunked_stats import _kernel_args

    dictionary = find_node(
        ChunkedDivergenceFunction.forward,
        lambda node: isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "kernel_args",
        "ChunkedDivergenceFunction.forward",
        "chunked_stats (`_kernel_args`)",
        "its forward no longer builds a `kernel_args` dictionary for its tile folds",
    ).value
    keys = tuple(getattr(key, "value", None) for key in getattr(dictionary, "keys", []))
    assert keys == CHUNKED_DIVERGENCE_KERNEL_ARGS, broken(
        "ChunkedDivergenceFunction.forward",
        "chunked_stats (`_kernel_args`, handed to TRL's tile folds and stored for TRL's backward)",
        f"its kernel_args are now {keys}, trl_tip builds {CHUNKED_DIVERGENCE_KERNEL_ARGS}",
    )
    assert tuple(_kernel_args(1.0, 1.0, None, 1.0, None)) == CHUNKED_DIVERGENCE_KERNEL_ARGS


# ---- transformers' training loop ----


def _calls(func, name: str) -> list[int]:
    """Line numbers of the calls `<anything>.name(...)` in `func`."""
    return sorted(
        node.lineno for node in ast.walk(function_ast(func))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == name
    )


def test_the_training_loop_steps_after_the_micro_batch_marked_for_sync():
    # PacedTrainer.training_step decides on the micro-batch marked `sync_gradients` whether the coming optimiser step
    # weighs nothing; it then drops the gradients (the optimiser leaves the parameters alone) and its scheduler wrapper
    # holds the schedule.
    from transformers import Trainer

    who = "PacedTrainer (zero-weight steps skipped in `training_step`, schedule held by `create_scheduler`'s wrapper)"
    loop = Trainer._run_epoch
    sync, train, step = _calls(loop, "_set_sync_gradients"), _calls(loop, "training_step"), _calls(loop, "step")
    assert sync and train and min(sync) < min(train), broken(
        "transformers Trainer._run_epoch", who,
        "it no longer marks the micro-batch that ends an accumulation window (`sync_gradients`) before its "
        "`training_step`",
    )
    source = inspect.getsource(loop)
    assert "self.optimizer.step()" in source and "self.lr_scheduler.step()" in source, broken(
        "transformers Trainer._run_epoch", who, "it no longer steps `self.optimizer` and then `self.lr_scheduler`",
    )
    in_order = source.index("self.optimizer.step()") < source.index("self.lr_scheduler.step()")
    assert in_order and max(step) > max(train), broken(
        "transformers Trainer._run_epoch", who,
        "it no longer steps the optimiser and the schedule after the micro-batches' `training_step`",
    )
    assert "create_scheduler" in names_used(Trainer._prepare_for_training), broken(
        "transformers Trainer._prepare_for_training", who,
        "it no longer builds its schedule with `self.create_scheduler`",
    )


def test_vllm_generation_keeps_its_sleeping_flag():
    from trl.generation.vllm_generation import VLLMGeneration

    assert "_llm_weights_sleeping" in names_used(VLLMGeneration.generate), broken(
        "VLLMGeneration.generate", "CPUVLLMGeneration (`mark_vllm_weights_awake`)",
        "it no longer reads `_llm_weights_sleeping`",
    )
    assert "_iter_named_params" in names_used(VLLMGeneration.sync_weights), broken(
        "VLLMGeneration.sync_weights", "CPUVLLMGeneration.sync_weights (`iter_vllm_weights`)",
        "TRL's own weight push no longer iterates `_iter_named_params`, so the two paths may push different names",
    )


# ---- The seam's patches are scoped ----


@pytest.mark.parametrize("module_name", ["trl.trainer.distillation_trainer", "trl.trainer.grpo_trainer"])
def test_trainers_build_their_vllm_backend_from_a_module_name(module_name):
    # `platform_vllm_generation` swaps this name while a trainer is built; if TRL stops reading it, the CPU path is
    # never taken and TRL's own weight push fails on vLLM's CPU build.
    from trl.generation.vllm_generation import VLLMGeneration

    module = importlib.import_module(module_name)
    assert getattr(module, "VLLMGeneration", None) is VLLMGeneration, broken(
        f"{module_name}.VLLMGeneration", "every trl_tip trainer on vLLM's CPU platform",
        "the trainer module no longer holds the name it builds its vLLM backend from",
    )
    init = module.DistillationTrainer.__init__ if "distillation" in module_name else module.GRPOTrainer.__init__
    assert "VLLMGeneration" in names_used(init), broken(
        f"{module_name} __init__", "every trl_tip trainer on vLLM's CPU platform",
        "the constructor no longer builds `VLLMGeneration` by its module-level name",
    )


def test_vllm_generation_has_the_hooks_the_cpu_path_overrides():
    # `CPUVLLMGeneration` overrides `_init_vllm` and `sync_weights`, and pushes what `_iter_named_params` yields.
    from trl.generation.vllm_generation import VLLMGeneration

    for name in ("_init_vllm", "sync_weights", "_iter_named_params", "generate"):
        assert callable(getattr(VLLMGeneration, name, None)), broken(
            f"VLLMGeneration.{name}", "CPUVLLMGeneration", "it no longer exists"
        )


def test_the_swap_is_scoped_to_the_construction(monkeypatch):
    from trl.generation.vllm_generation import VLLMGeneration

    from trl_tip import _trl_compat
    from trl_tip.vllm_cpu import CPUVLLMGeneration

    modules = [importlib.import_module(name) for name in _trl_compat._TRAINER_MODULES_BUILDING_VLLM]

    class Args:
        use_vllm = True

    monkeypatch.setattr(_trl_compat, "vllm_runs_on_cpu", lambda: True)
    with pytest.raises(RuntimeError), _trl_compat.platform_vllm_generation(Args()):
        assert all(module.VLLMGeneration is CPUVLLMGeneration for module in modules)
        raise RuntimeError("a trainer that fails to build")
    assert all(module.VLLMGeneration is VLLMGeneration for module in modules)
    # Without use_vllm, or off vLLM's CPU platform, nothing is replaced.
    Args.use_vllm = False
    with _trl_compat.platform_vllm_generation(Args()):
        assert all(module.VLLMGeneration is VLLMGeneration for module in modules)
    monkeypatch.setattr(_trl_compat, "vllm_runs_on_cpu", lambda: False)
    with _trl_compat.platform_vllm_generation(type("WithVLLM", (), {"use_vllm": True})()):
        assert all(module.VLLMGeneration is VLLMGeneration for module in modules)


def test_the_module_patches_are_scoped():
    import trl.kernels.chunked_divergence as kernel
    import trl.trainer.distillation_trainer as distillation

    from trl_tip import _trl_compat

    loss, load, project = distillation._chunked_divergence_loss, distillation.create_model_from_path, kernel._project

    def stand_in(*args, **kwargs):
        raise AssertionError("not called")

    with pytest.raises(RuntimeError), _trl_compat.divergence_loss_replaced_by(stand_in):
        assert distillation._chunked_divergence_loss is stand_in
        raise RuntimeError("a failing loss")
    assert distillation._chunked_divergence_loss is loss

    seen = []
    with pytest.raises(RuntimeError), _trl_compat.models_loaded_by_path_passed_to(lambda *a: seen.append(a)):
        assert distillation.create_model_from_path is not load
        raise RuntimeError("a failing constructor")
    assert distillation.create_model_from_path is load

    with pytest.raises(RuntimeError), _trl_compat.tile_projection_wrapped(lambda f: stand_in):
        assert kernel._project is stand_in
        raise RuntimeError("a failing step")
    assert kernel._project is project
