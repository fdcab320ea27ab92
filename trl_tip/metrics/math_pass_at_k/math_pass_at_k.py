"""
`evaluate` metric: unbiased pass@k, mean@n and the ungradable count of sampled completions of math problems.

The grading and the estimator are `trl_tip.evaluation`'s (`grade_problems`, `summarize`), the ones `trl-tip eval`
uses, so both report the same numbers for the same completions.
"""

import datasets
import evaluate

from trl_tip.evaluation import grade_problems, summarize


_DESCRIPTION = """
For each problem, n sampled completions are graded against the gold answer with math-verify (the last \\boxed{} or
'Answer:' line of a completion). pass@k is the unbiased estimator 1 - C(n-c, k) / C(n, k) of a problem with c correct
samples out of n, averaged over problems; mean@n is the share of correct samples over all problems and samples. A
gold answer that math-verify cannot parse makes every sample of its problem wrong; such problems are counted.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[str]]`): per problem, its n sampled completions (the same n for every problem).
    references (`list[str]`): per problem, its gold answer as text (e.g. "\\frac{1}{2}", "42").
    k (`int` or `list[int]`, *optional*): the budgets to report pass@k for, each in 1..n; default: every k = 1..n.

Returns:
    `dict`: `pass@{k}` for each requested k, `mean@n`, `num_ungradable` (problems whose gold answer does not parse),
    `num_problems` and `num_samples` (n).

Example:

    >>> metric = evaluate.load("path/to/trl_tip/metrics/math_pass_at_k")
    >>> predictions = [["\\\\boxed{4}", "5"], ["\\\\boxed{3}", "\\\\boxed{2}"]]
    >>> metric.compute(predictions=predictions, references=["4", "3"], k=[1, 2])
    {'pass@1': 0.5, 'pass@2': 1.0, 'mean@n': 0.5, 'num_ungradable': 0, 'num_problems': 2, 'num_samples': 2}
"""

_CITATION = """
@article{chen2021codex,
  title={Evaluating Large Language Models Trained on Code},
  author={Chen, Mark and others},
  journal={arXiv preprint arXiv:2107.03374},
  year={2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MathPassAtK(evaluate.Metric):
    """Unbiased pass@k and mean@n of sampled math completions, graded by `trl_tip.evaluation`."""

    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("string")), "references": datasets.Value("string")}
            ),
            reference_urls=["https://arxiv.org/abs/2107.03374"],
        )

    def _compute(self, predictions, references, k=None):
        sizes = sorted({len(completions) for completions in predictions})
        if not sizes:
            raise ValueError("math_pass_at_k got no problems.")
        if len(sizes) > 1:
            raise ValueError(
                f"math_pass_at_k needs the same number of completions for every problem, got sizes {sizes}; "
                "sample n completions per problem (as `trl-tip eval --n` does)."
            )
        n = sizes[0]
        if n < 1:
            raise ValueError("math_pass_at_k needs at least one completion per problem, got empty lists.")
        ks = list(range(1, n + 1)) if k is None else [k] if isinstance(k, int) else list(k)
        bad = [value for value in ks if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= n]
        if bad or not ks:
            raise ValueError(f"k must be integers in 1..{n} (the completions per problem), got {k!r}.")
        completions = [text for problem in predictions for text in problem]
        summary = summarize(grade_problems(references, completions, None, n), n)
        result = {f"pass@{value}": summary["pass_at_k"][value] for value in ks}
        result.update(
            {
                "mean@n": summary["mean_accuracy"],
                "num_ungradable": summary["num_ungradable"],
                "num_problems": summary["num_problems"],
                "num_samples": n,
            }
        )
        return result
