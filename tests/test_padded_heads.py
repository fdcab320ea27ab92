"""Teachers and students whose `lm_head`s are padded to different sizes over one tokenizer."""

from functools import partial

import pytest
import torch
from transformers import AutoModelForCausalLM

import reference
from builders import PADDED_HEAD_ROWS, swap_token_ids, training_config
import trl_tip.trainers.tip_distill.tip_distill_trainer as tip_module
from trl_tip import PacedConfig, PacedTrainer, TipDistillConfig, TipDistillTrainer, selective_divergence_loss
from trl_tip.losses import STUDENT_SIDE_METHODS
from trl_tip.selection import SELECTION_METHODS
from trl_tip.tiny_models import build_tokenizer, save_pretrained_pair
from trl_tip.vocabulary import shared_vocab_size


TOKENS = 259  # the byte-level test tokenizer's size
STUDENT_ROWS, TEACHER_ROWS = PADDED_HEAD_ROWS["student"], PADDED_HEAD_ROWS["teacher"]

NUM_PROBLEMS = 8

_config = partial(training_config, per_device_train_batch_size=4, max_steps=1, learning_rate=1e-3,
                  max_completion_length=12)


def _shared(logits):
    # The tokenizer's rows: the padding past them is scored by neither model.
    return logits[..., :TOKENS]


# ---- The loss over the shared rows ----

@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
def test_loss_over_shared_rows_matches_a_float64_full_logit_reference(beta):
    generator = torch.Generator().manual_seed(0)
    h_s, h_t = torch.randn(2, 5, 16, generator=generator), torch.randn(2, 5, 24, generator=generator)
    w_s = torch.randn(STUDENT_ROWS, 16, generator=generator).requires_grad_()
    w_t = torch.randn(TEACHER_ROWS, 24, generator=generator)
    b_s, b_t = torch.randn(STUDENT_ROWS, generator=generator), torch.randn(TEACHER_ROWS, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])

    result = selective_divergence_loss(
        h_s, h_t, w_s, w_t, mask, beta, student_lm_head_bias=b_s, teacher_lm_head_bias=b_t, method="all",
        vocab_size=TOKENS,
    )
    result.loss.backward()

    w_ref = w_s.detach().double().requires_grad_()
    s_logits = _shared(reference.logits(h_s, w_ref, b_s))
    t_logits = _shared(reference.logits(h_t, w_t, b_t))
    per_token = reference.generalized_jsd(s_logits, t_logits, beta)
    expected = reference.token_mean(per_token, mask)
    expected.backward()
    entropy = reference.normalized_entropy(s_logits)

    # float32 logits of magnitude ~|h||w| ≈ 20 carry ~1e-6 relative error per term; a KL of these O(1) terms is good
    # to ~1e-5 of the logit scale. A loss over all rows (the padding included) is off by O(1e-2) here.
    scale = (h_s.double() @ w_ref.detach().t()).abs().max().item()
    assert torch.allclose(result.loss.double(), expected.detach(), rtol=0, atol=1e-6 * scale)
    assert torch.allclose(result.entropy[mask.bool()].double(), entropy.detach()[mask.bool()], atol=1e-6 * scale)
    if beta == 1.0:
        assert torch.allclose(result.reverse_kl[mask.bool()].double(), per_token.detach()[mask.bool()],
                              atol=1e-6 * scale)
    # The padding rows receive exactly zero gradient; the shared rows that of the reference.
    assert torch.equal(w_s.grad[TOKENS:], torch.zeros_like(w_s.grad[TOKENS:]))
    grad_scale = w_ref.grad.abs().max().item()
    assert grad_scale > 0
    assert torch.allclose(w_s.grad[:TOKENS].double(), w_ref.grad[:TOKENS], rtol=0, atol=1e-5 * grad_scale)


def test_shared_vocab_size():
    assert shared_vocab_size(300, 300, 259) is None
    assert shared_vocab_size(272, 300, 259) == 259
    with pytest.raises(ValueError, match="one head cannot score every token"):
        shared_vocab_size(250, 300, 259)


def test_padded_heads_with_another_or_no_tokenizer_are_refused(padded_model_paths, problems, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(padded_model_paths["teacher"])
    bare = tmp_path / "bare-teacher"
    teacher.save_pretrained(bare)  # no tokenizer next to the weights
    with pytest.raises(ValueError, match=r"the teacher.s 300\. .*no tokenizer to compare"):
        TipDistillTrainer(model=padded_model_paths["student"], teacher_model=str(bare),
                          args=_config(TipDistillConfig, tmp_path / "a"), train_dataset=problems)
    swapped = save_pretrained_pair(teacher, build_tokenizer(), tmp_path / "swapped-teacher")
    swap_token_ids(swapped)
    with pytest.raises(ValueError, match="tokenizer differs from the student's"):
        TipDistillTrainer(model=padded_model_paths["student"], teacher_model=swapped,
                          args=_config(TipDistillConfig, tmp_path / "b"), train_dataset=problems)


# ---- Training a padded pair ----

def _record_steps(trainer, monkeypatch):
    """Record, for each loss computed, the inputs, the loss and the kept-token mask."""
    records = []
    compute_loss = trainer.compute_loss
    selective = tip_module.selective_divergence_loss

    def recording_selective(*args, **kwargs):
        result = selective(*args, **kwargs)
        records[-1]["keep"] = result.keep.detach().clone()
        return result

    def recording_compute_loss(model, inputs, *args, **kwargs):
        records.append({"inputs": {k: v for k, v in inputs.items()}})
        loss = compute_loss(model, inputs, *args, **kwargs)
        records[-1]["loss"] = loss.detach().clone()
        return loss

    monkeypatch.setattr(tip_module, "selective_divergence_loss", recording_selective)
    trainer.compute_loss = recording_compute_loss
    return records


def _reference_per_token(paths, inputs, beta):
    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float64)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float64)
    assert student.lm_head.weight.shape[0] == STUDENT_ROWS and teacher.lm_head.weight.shape[0] == TEACHER_ROWS
    sequence = [inputs[key] for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")]
    logits_s = reference.completion_logits(student, *sequence)
    logits_t = reference.completion_logits(teacher, *sequence)
    return reference.generalized_jsd(_shared(logits_s), _shared(logits_t), beta), logits_s.abs().max().item()


@pytest.mark.parametrize("token_selection", ["all", "soft_or"])
def test_padded_pair_trains_with_tip_and_the_loss_is_the_reference(padded_model_paths, problems, tmp_path, monkeypatch,
                                                                   token_selection):
    trainer = TipDistillTrainer(model=padded_model_paths["student"], teacher_model=padded_model_paths["teacher"],
                                args=_config(TipDistillConfig, tmp_path, token_selection=token_selection),
                                train_dataset=problems)
    assert trainer.shared_vocab_size == TOKENS
    # TRL's init check is passed for the constructor only: the teacher's config keeps its real size.
    assert trainer.teacher_model.config.vocab_size == TEACHER_ROWS
    records = _record_steps(trainer, monkeypatch)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()

    assert len(records) == 1
    inputs, keep = records[0]["inputs"], records[0]["keep"]
    assert int(inputs["completion_ids"].max()) < TOKENS  # neither model writes a padding id
    per_token, scale = _reference_per_token(padded_model_paths, inputs, trainer.beta)
    mask = inputs["completion_mask"].bool()
    if token_selection == "all":
        assert torch.equal(keep, mask)
    else:
        assert keep.sum() < mask.sum()
    expected = reference.token_mean(per_token, keep)
    assert torch.allclose(records[0]["loss"].double(), expected, rtol=0, atol=1e-6 * scale)
    head = trainer.model.lm_head.weight.detach()
    assert not torch.equal(head[:TOKENS], before["lm_head.weight"][:TOKENS])
    # Padding rows get no gradient; only AdamW's decoupled weight decay touches them.
    decay = 1 - trainer.args.learning_rate * trainer.args.weight_decay
    torch.testing.assert_close(head[TOKENS:], before["lm_head.weight"][TOKENS:] * decay, rtol=1e-6, atol=0)


def _half_pass_reward(completions, **kwargs):
    # Every other rollout passes, so every problem's estimated pass rate is 1/2 and its PACED weight 1/4.
    return [float(index % 2) for index in range(len(completions))]


def test_padded_pair_trains_with_paced_and_the_loss_is_the_reference(padded_model_paths, problems, tmp_path, monkeypatch):
    config = _config(PacedConfig, tmp_path, pass_rate_rollouts=2)
    trainer = PacedTrainer(model=padded_model_paths["student"], teacher_model=padded_model_paths["teacher"], args=config,
                           train_dataset=problems, reward_funcs=_half_pass_reward)
    assert trainer.shared_vocab_size == TOKENS
    records = _record_steps(trainer, monkeypatch)
    trainer.train()

    assert len(records) == 1
    inputs, keep = records[0]["inputs"], records[0]["keep"]
    weights = inputs["paced_weights"].double()
    assert weights.gt(0).all()
    per_token, scale = _reference_per_token(padded_model_paths, inputs, trainer.beta)
    expected = reference.paced_loss(per_token, keep, weights, inputs["paced_weight_sum"].double())
    assert torch.allclose(records[0]["loss"].double(), expected, rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize("method", [m for m in SELECTION_METHODS if m != "all"])
def test_every_rule_scores_and_trains_over_the_shared_rows(method):
    generator = torch.Generator().manual_seed(3)
    h_s, h_t = torch.randn(3, 8, 16, generator=generator), torch.randn(3, 8, 24, generator=generator)
    w_s, w_t = torch.randn(STUDENT_ROWS, 16, generator=generator), torch.randn(TEACHER_ROWS, 24, generator=generator)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    result = selective_divergence_loss(h_s, h_t, w_s, w_t, mask, 1.0, method=method, ratio=0.5,
                                       generator=torch.Generator().manual_seed(0), vocab_size=TOKENS)
    s_logits, t_logits = _shared(reference.logits(h_s, w_s)), _shared(reference.logits(h_t, w_t))
    reverse = reference.reverse_kl(s_logits, t_logits)
    entropy = reference.normalized_entropy(s_logits)
    scale = max((h_s @ w_s.t()).abs().max().item(), (h_t @ w_t.t()).abs().max().item())
    valid = mask.bool()
    # The statistics the rule ranks by are those of the shared rows, and the loss is the kept tokens' mean. The rules
    # that select from the student alone project the teacher on kept tokens only: their divergence exists there only.
    scored = result.keep if method in STUDENT_SIDE_METHODS else valid
    assert torch.isnan(result.reverse_kl[valid & ~scored]).all()
    assert torch.allclose(result.reverse_kl[scored].double(), reverse[scored], rtol=0, atol=1e-5 * scale)
    assert torch.allclose(result.entropy[valid].double(), entropy[valid], rtol=0, atol=1e-5 * scale)
    assert 0 < result.keep.sum() < valid.sum()
    assert torch.allclose(result.loss.double(), reverse[result.keep].mean(), rtol=0, atol=1e-5 * scale)
