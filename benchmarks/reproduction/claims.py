"""
The papers' claims that docs/results.md tests, as data: for each task, each claim's paper, its text, and how it is
measured from the stored records. `claim_rows` measures them and judges each with the page's one rule
(`results.verdict`); nothing here holds a measured number.

A claim is measured as one of:

- `Compare`: one value per seed against a reference value of the same seed, either of another variant (a paired
  comparison: same seed, same data order and sampling stream) or of the same record (after training against before
  it), in the claim's direction ("higher", "lower", "no worse");
- `AllOf`: parts that must hold together (a part marked `NOT_REFUTED` need only not fail, as the accuracy side of
  "fewer tokens at no worse accuracy");
- `Shares`: the taxonomy's token shares against the paper's ranges;
- nothing, with a reason the built-in models cannot test it (`Claim.untestable`).

A claim may also have a `precondition`, measured like the claim: unless it holds, the claim is "not testable" and the
measured precondition is what the page shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .results import FAILS, HOLDS, NOISE, NOT_TESTABLE, _interval, _number, mean_std, verdict
from .settings import spec_of


# An `AllOf` part that needs only not to fail.
NOT_REFUTED = "not refuted"


@dataclass(frozen=True)
class Metric:
    """
    A number read from a record. `name` is a string or a function of the record (for names that depend on what was
    run, such as the number of samples); `percent` values are fractions, shown in % with differences in points.
    `key` names the metric the paired-difference tables compare ("accuracy": greedy test accuracy).
    """

    name: str | Callable[[dict], str]
    read: Callable[[dict], float]
    percent: bool = False
    key: str | None = None

    def describe(self, record: dict) -> str:
        return self.name(record) if callable(self.name) else self.name

    @property
    def unit(self) -> str:
        return " %" if self.percent else " tokens"

    @property
    def difference_unit(self) -> str:
        return " points" if self.percent else " tokens"


def _largest_k(measured: dict) -> str:
    return max(measured["pass_at_k"], key=int)


def _hardest_level(record: dict) -> str:
    return max(record["eval"]["levels"], key=int)


def pass_at(k: int | None = None, before: bool = False) -> Metric:
    """pass@k after training (or, `before`, of the model the run started from); `k=None`: the largest k measured."""
    field = "before_pass_at_k" if before else "pass_at_k"

    def k_of(record):
        return str(k) if k is not None else _largest_k(record[field])

    prefix = "the base model's " if before else ""
    return Metric(lambda r: f"{prefix}pass@{k_of(r)}", lambda r: r[field]["pass_at_k"][k_of(r)], percent=True)


ACCURACY = Metric("greedy accuracy", lambda r: r["eval"]["accuracy"], percent=True, key="accuracy")
TOKENS = Metric("mean completion tokens", lambda r: r["eval"]["mean_completion_tokens"])
BEFORE_ACCURACY = Metric("greedy accuracy before training", lambda r: r["before"]["accuracy"], percent=True)
BEFORE_TOKENS = Metric("mean completion tokens before training", lambda r: r["before"]["mean_completion_tokens"])
INSTRUCTED_TOKENS = Metric("mean completion tokens before training, without → with the instruction",
                           lambda r: r["teachers_view"]["mean_completion_tokens"])
SAMPLED_MEAN = Metric(lambda r: f"mean@{r['settings']['eval_samples']}", lambda r: r["sampled"]["mean_accuracy"],
                      percent=True)
HARDEST_LEVEL_TOKENS = Metric(lambda r: f"mean completion tokens at level {_hardest_level(r)}",
                              lambda r: r["eval"]["levels"][_hardest_level(r)]["mean_completion_tokens"])


@dataclass(frozen=True)
class Measured:
    """What the page shows of a measured claim: the numbers (`text`) and the verdict."""

    text: str
    verdict: str


def _variant_label(method: str, variant: str) -> str:
    return spec_of(method)["variants"][variant]["label"]


@dataclass(frozen=True)
class Compare:
    """
    `metric` of `method`/`variant` against `reference_metric` (default: the same metric) of `method`/`reference`
    (default: the same variant, i.e. within each record, e.g. after training against before it), seed by seed; the
    claim says the value is `direction` ("higher", "lower" or "no worse") than the reference. `relative` adds the
    change of the means in % of the reference (for token counts).
    """

    method: str
    variant: str
    metric: Metric
    direction: str = "higher"
    reference: str | None = None
    reference_metric: Metric | None = None
    relative: bool = False

    @property
    def paired(self) -> bool:
        """Two variants run with the same seeds (rather than two values of one record)."""
        return self.reference is not None and self.reference != self.variant

    def pairs(self, results: dict) -> list[tuple[dict, dict]]:
        variants = results.get(self.method) or {}
        reference = self.reference or self.variant
        if self.variant not in variants or reference not in variants:
            return []
        by_seed = {r["settings"]["seed"]: r for r in variants[reference]}
        return [(record, by_seed[record["settings"]["seed"]]) for record in variants[self.variant]
                if record["settings"]["seed"] in by_seed]

    def label(self, results: dict) -> str:
        record = self.pairs(results)[0][0]
        if not self.paired:
            return self.metric.describe(record)
        label = f"{_variant_label(self.method, self.variant)} − {_variant_label(self.method, self.reference)}"
        return label if self.metric.key == "accuracy" else f"{self.metric.describe(record)} of {label}"

    def measure(self, results: dict) -> Measured | None:
        pairs = self.pairs(results)
        if not pairs:
            return None
        reference_metric = self.reference_metric or self.metric
        scale = 100.0 if self.metric.percent else 1.0
        values = [scale * self.metric.read(a) for a, _ in pairs]
        references = [scale * reference_metric.read(b) for _, b in pairs]
        differences = [a - b for a, b in zip(values, references)]
        oriented = [-d for d in differences] if self.direction == "lower" else differences
        mean, reference_mean = mean_std(values)[0], mean_std(references)[0]
        unit = self.metric.unit
        if self.paired:
            text = f"{_number(mean)} vs {_number(reference_mean)}{unit}, paired "
        else:
            text = f"{_number(reference_mean)} → {_number(mean)}{unit}, "
        text += f"{_number(mean_std(differences)[0])}{self.metric.difference_unit} {_interval(differences)}"
        if self.relative and reference_mean:
            text += f" ({_number(100 * (mean - reference_mean) / reference_mean, 0)} %)"
        if len(differences) > 1:
            text += ", per seed " + " / ".join(_number(d) for d in differences)
        return Measured(text, verdict(oriented, self.direction))

    def compares(self, method: str, variant: str, reference: str, key: str) -> bool:
        """Whether this is the paired comparison of `variant` against `reference` on the metric named `key`."""
        return (self.method, self.variant, self.reference, self.metric.key) == (method, variant, reference, key)


@dataclass(frozen=True)
class AllOf:
    """
    Parts that must hold together, each `(measure, HOLDS)` or `(measure, NOT_REFUTED)`: the claim does not hold when
    any part does not; it holds when every `HOLDS` part holds (and, by the first rule, no `NOT_REFUTED` part fails);
    otherwise it is within noise. Measured only when every part is.
    """

    parts: tuple[tuple[Compare, str], ...]

    def measure(self, results: dict) -> Measured | None:
        measured = [(part, part.measure(results), needed) for part, needed in self.parts]
        if any(m is None for _, m, _ in measured):
            return None
        verdicts = [m.verdict for _, m, _ in measured]
        if FAILS in verdicts:
            judged = FAILS
        elif all(m.verdict == HOLDS for _, m, needed in measured if needed == HOLDS):
            judged = HOLDS
        else:
            judged = NOISE
        return Measured("; ".join(f"{part.label(results)}: {m.text}" for part, m, _ in measured), judged)

    def compares(self, *args) -> bool:
        return False

    def comparisons(self) -> list[Compare]:
        return [part for part, _ in self.parts]


@dataclass(frozen=True)
class Shares:
    """
    The taxonomy's token shares (`quadrant_shares` of each panel: the student's rollouts before and after training)
    against the paper's ranges, `(name, quadrants 1–4 summed, lowest %, highest %)`. Each panel of each seed is one
    measurement, compared at the precision shown (0.1 %). A range holds when every measurement is in it and does not
    hold when every one is outside; the claim holds when every range holds and does not hold when any range does not.
    """

    method: str
    variant: str
    ranges: tuple[tuple[str, tuple[int, ...], float, float], ...]

    def measure(self, results: dict) -> Measured | None:
        records = (results.get(self.method) or {}).get(self.variant)
        if not records:
            return None
        panels = [panel for record in records for panel in record["panels"].values()]
        verdicts, cells = [], []
        for name, quadrants, lowest, highest in self.ranges:
            shares = [round(100 * sum(panel["quadrant_shares"][q - 1] for q in quadrants), 1) for panel in panels]
            inside = [lowest <= share <= highest for share in shares]
            verdicts.append(HOLDS if all(inside) else FAILS if not any(inside) else NOISE)
            cells.append(f"{name} {' / '.join(f'{share:.1f}' for share in shares)} %")
        names = " / ".join(records[0]["panels"])
        seeds = ", ".join(str(r["settings"]["seed"]) for r in records)
        judged = FAILS if FAILS in verdicts else HOLDS if all(v == HOLDS for v in verdicts) else NOISE
        return Measured(f"{', '.join(cells)} (the student's rollouts {names} training; seed {seeds})", judged)

    def compares(self, *args) -> bool:
        return False


@dataclass(frozen=True)
class Claim:
    """
    A paper's claim: `measure` (a `Compare`, `AllOf` or `Shares`), or `untestable`, a reason without numbers that the
    built-in models cannot test it. A `precondition` that does not hold makes the claim not testable; `unmet` says
    what that means, before the precondition's numbers.
    """

    paper: str
    text: str
    measure: Compare | AllOf | Shares | None = None
    untestable: str | None = None
    precondition: Compare | None = None
    unmet: str = ""

    def judge(self, results: dict) -> Measured | None:
        """The claim's numbers and verdict from `results` ({method: {variant: [record, ...]}}); None if unmeasured."""
        if self.untestable is not None:
            return Measured(self.untestable, NOT_TESTABLE)
        if self.precondition is not None:
            measured = self.precondition.measure(results)
            if measured is None:
                return None
            if measured.verdict != HOLDS:
                return Measured(f"{self.unmet} ({self.precondition.label(results)}: {measured.text})", NOT_TESTABLE)
        return self.measure.measure(results)


def _tip(variant: str, reference: str, direction: str = "higher") -> Compare:
    return Compare("tip", variant, ACCURACY, direction, reference)


TIP_SOFT_OR = Claim("TIP", "soft-OR 50 % beats all-token OPD (MATH-500 79.1 vs 76.7 %)", _tip("soft_or_50", "all"))
TIP_ENTROPY = Claim("TIP", "entropy-sample 50 % beats all tokens (78.6 vs 76.7 %)", _tip("entropy_sample_50", "all"))
TIP_CHOICE = Claim("TIP", "the choice of tokens matters (soft-OR and entropy-sample above the random control)",
                   AllOf(((_tip("soft_or_50", "random_50"), HOLDS), (_tip("entropy_sample_50", "random_50"), HOLDS))))
TIP_SOFT_OR_20 = Claim("TIP", "soft-OR 20 % stays near all tokens (77.6 vs 76.7 %)",
                       _tip("soft_or_20", "all", "no worse"))
TIP_Q3 = Claim("TIP", "overconfident (Q3) 10 % stays near all tokens (76.1 vs 76.7 %)",
               _tip("overconfident_10", "all", "no worse"))
TIP_JSD = Claim("TIP", "(the authors' code, not the paper) a bounded divergence axis, JSD / ln 2, for scoring",
                _tip("soft_or_50_jsd", "soft_or_50"))
TIP_MEMORY = Claim("TIP", "−47 % peak training memory at 50 %", untestable=(
    "the built-in models' vocabulary is too small for the `lm_head` backward that selection skips to show in peak "
    "memory; the saving is measured at a full-size vocabulary in [benchmarks](benchmarks.md)"))
TIP_SHARES = Claim("TIP", "token shares: Q4 40–47 %, Q1+Q2 40–52 %, Q3 3–15 %",
                   Shares("taxonomy", "soft_or_50", (("Q4", (4,), 40, 47), ("Q1+Q2", (1, 2), 40, 52),
                                                     ("Q3", (3,), 3, 15))))
PACED_WEIGHTING = Claim("PACED", "p(1 − p) weighting beats unweighted distillation (79.4 vs 76.8 %)",
                        Compare("paced", "paced", ACCURACY, "higher", "unweighted"))
PACED_SCHEDULE = Claim("PACED", "forward KL first, then reverse KL, beats reverse KL only",
                       Compare("paced", "paced_forward_then_reverse", ACCURACY, "higher", "paced"))
PACED_SAMPLING = Claim("PACED", "drawing problems in proportion to w(p) instead of weighting the loss",
                       Compare("paced", "paced_sample", ACCURACY, "no worse", "paced"))
PACED_SELF = Claim("PACED", "self-distillation: the student, reading the reference solution, as its own teacher",
                   untestable=("the lab's student has not learnt to read a reference solution: with one in its prompt "
                               "it scores far below its plain-prompt accuracy, so its self-teacher knows less than it "
                               "does ([the lab's page](lab_task.md))"))
# OPSDC distils the model towards itself under the conciseness instruction: testable only where that is shorter.
_CONCISE_MODE = {
    "precondition": Compare("opsdc", "v2_m50", INSTRUCTED_TOKENS, "lower", reference_metric=BEFORE_TOKENS),
    "unmet": "the model writes no shorter with the instruction, so there is no concise mode to distil",
}
OPSDC_COMPRESSION = Claim("OPSDC", "−35 to −57 % tokens at equal or higher accuracy", AllOf((
    (Compare("opsdc", "v2_m50", TOKENS, "lower", reference_metric=BEFORE_TOKENS, relative=True), HOLDS),
    (Compare("opsdc", "v2_m50", ACCURACY, "no worse", reference_metric=BEFORE_ACCURACY), NOT_REFUTED),
)), **_CONCISE_MODE)
OPSDC_REFRESH = Claim("OPSDC", "M = 1 (a live teacher) collapses; M = 50 is the working point",
                      Compare("opsdc", "v2_m50", ACCURACY, "higher", "v2_m1"), **_CONCISE_MODE)
OPSDC_DIFFICULTY = Claim("OPSDC", "v2 (difficulty-aware) compresses hard problems less than v1",
                         Compare("opsdc", "v2_m50", HARDEST_LEVEL_TOKENS, "higher", "v1_m50"), **_CONCISE_MODE)
ACE_PATHOLOGY = Claim("ACE", "the pathology it targets: GRPO raises pass@1 while pass@k at large k falls below the "
                      "base model's", AllOf((
                          (Compare("ace", "grpo_long", pass_at(1), "higher", reference_metric=pass_at(1, before=True)),
                           HOLDS),
                          (Compare("ace", "grpo_long", pass_at(), "lower", reference_metric=pass_at(before=True)),
                           HOLDS),
                      )))
ACE_PASS_AT_K = Claim("ACE", "ACE-GRPO raises pass@k over GRPO, more at larger k; pass@1 unchanged", AllOf((
    (Compare("ace", "ace", pass_at(), "higher", "grpo"), HOLDS),
    (Compare("ace", "ace", pass_at(1), "no worse", "grpo"), NOT_REFUTED),
)))
BRIDGE = Claim("bridge", "the bridge beats direct (cold) student GRPO (MATH avg@16 78.5 vs 75.9 %)",
               Compare("bridge", "bridge", SAMPLED_MEAN, "higher", "student_grpo"))

CLAIMS = {
    "arithmetic": [TIP_SOFT_OR, TIP_ENTROPY, TIP_CHOICE, TIP_SOFT_OR_20, TIP_Q3, TIP_JSD, TIP_MEMORY, TIP_SHARES,
                   PACED_WEIGHTING, PACED_SCHEDULE, OPSDC_COMPRESSION, OPSDC_REFRESH, ACE_PASS_AT_K, BRIDGE],
    "lab": [TIP_SOFT_OR, TIP_ENTROPY, TIP_CHOICE, TIP_SOFT_OR_20, TIP_Q3, TIP_JSD, TIP_SHARES, TIP_MEMORY,
            PACED_WEIGHTING, PACED_SCHEDULE, PACED_SAMPLING, PACED_SELF, OPSDC_COMPRESSION, OPSDC_DIFFICULTY,
            OPSDC_REFRESH, ACE_PATHOLOGY, ACE_PASS_AT_K, BRIDGE],
}


def claim_rows(task: str, results: dict) -> tuple[list[tuple[Claim, Measured]], list[Claim]]:
    """The task's claims judged from `results`, and those whose records are missing (awaiting runs)."""
    rows, awaiting = [], []
    for claim in CLAIMS[task]:
        measured = claim.judge(results)
        if measured is None:
            awaiting.append(claim)
        else:
            rows.append((claim, measured))
    return rows, awaiting


def paired_direction(task: str, method: str, variant: str, reference: str, key: str = "accuracy") -> str | None:
    """The direction of the task's claim (or claim part) that compares `variant` with `reference` on `key`, if any."""
    for claim in CLAIMS[task]:
        measure = claim.measure
        for part in measure.comparisons() if isinstance(measure, AllOf) else [measure]:
            if part is not None and part.compares(method, variant, reference, key):
                return part.direction
    return None
