"""
Tolerances for comparing two float32 computations of the same quantity, derived from the arithmetic rather than from
what one processor printed.

Two runs that compute the same gradient with a different batch split (one micro-batch of 8 against two accumulated
micro-batches of 4) add the same per-token terms in a different order, and the matrix kernels may block their
reductions differently for another batch shape. Each float32 reduction of n terms then differs by at most about
n · u · Σ|terms| (u = 2⁻²⁴, the unit roundoff), and a gradient chains a few such reductions (forward, backward, the
accumulation itself). For the tiny test models (≤ 256 completion tokens a step, hidden sizes ≤ 64) n · u is ≈ 1.5e-5,
so a tolerance of `REORDERING_TOLERANCE` = 1e-4 of the tensor's own scale covers the chained reductions with margin,
while the errors these tests exist to catch (a micro-batch normalised by its own token count instead of the global one,
a weight sum of the wrong scope) are of the order of the gradient itself.

Parameters after an AdamW step are the wrong place to compare: Adam's first update is lr · g / (|g| + ε), whose
derivative in g is lr · ε / (|g| + ε)², so an element whose gradient is near ε turns float32 noise into a visible
parameter difference. The gradient before the optimiser step is what batch splitting must preserve; compare that.
"""

import torch
from transformers import TrainerCallback


FLOAT32_UNIT_ROUNDOFF = 2.0**-24
REORDERING_TOLERANCE = 1e-4


class GradientRecorder(TrainerCallback):
    """Copies every trainable parameter's gradient just before each optimiser step (after clipping), by name."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append(
            {
                name: p.grad.detach().clone()
                for name, p in model.named_parameters()
                if p.requires_grad and p.grad is not None
            }
        )


def assert_reordered_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = REORDERING_TOLERANCE):
    """
    Asserts two float32 results of the same sums taken in another order agree: elementwise within `tolerance` of the
    larger of the two tensors' largest magnitude (see the module docstring for where the number comes from).
    """
    scale = max(actual.abs().max().item(), expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * scale)


def assert_same_gradients(first: GradientRecorder, second: GradientRecorder):
    """Both runs took the same number of optimiser steps, and every step's gradients agree up to reordering."""
    assert len(first.steps) == len(second.steps) > 0
    for step_a, step_b in zip(first.steps, second.steps, strict=True):
        assert step_a.keys() == step_b.keys() and step_a
        # All-zero gradients would make the comparison vacuous.
        assert any(grad.abs().max() > 0 for grad in step_a.values())
        for name in step_a:
            assert_reordered_close(step_a[name], step_b[name])


# A float32 computation checked against a float64 reference of the same formula. Each float32 logit is a dot product
# of H ≤ 128 terms, off by at most H · u ≈ 8e-6 of |h|·|w| (in practice √H · u, ≈ 7e-7), and the log-partition,
# softmax and divergence sums add a few u of the logit scale on top; 1e-5 of the magnitude of the terms involved (the
# logits for a divergence, the tensor's own largest element for a gradient) bounds that with margin, while a wrong
# formula (a missing normaliser, the wrong rows, the wrong direction of a KL) is off by a sizeable fraction of it.
FLOAT64_REFERENCE_TOLERANCE = 1e-5


def assert_close_to_float64(actual: torch.Tensor, reference: torch.Tensor, scale: float | None = None,
                            tolerance: float = FLOAT64_REFERENCE_TOLERANCE):
    """
    Asserts a float32 result agrees with its float64 reference elementwise within `tolerance · scale` (absolute) and
    `tolerance` (relative). `scale` is the magnitude of the terms the float32 computation combined; by default the
    larger of the two tensors' largest magnitude.
    """
    if scale is None:
        scale = max(actual.abs().max().item(), reference.abs().max().item())
    assert scale > 0, "a comparison against an all-zero reference cannot fail"
    torch.testing.assert_close(actual.double(), reference.double(), rtol=tolerance, atol=tolerance * scale)
