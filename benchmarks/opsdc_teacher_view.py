"""
Why OPSDC erodes accuracy on the lab before it compresses: what the instructed teacher says about the student's own
tokens, position by position, at step 0.

The built-in run (`examples/opsdc.py`: the lab's base model, instruction v2, T = 1, <= 128 tokens, seed 0) is set up
as it ships; the trainer draws one rollout per test prompt with its own generation (`_generate_and_score_completions`,
which also builds the teacher's prompts), and the trainer's own loss (`_compute_loss`, the mean over rollouts of each
rollout's mean reverse KL) is computed on them. Both models (the student and the step-0 snapshot) are then run again in
float64 on exactly the sequences the loss saw (the student's prompt ⊕ completion, the teacher's prompt ⊕ the same
completion), and every completion position is measured:

- the reverse KL KL(student || teacher) at that position (the loss's summand; its float64 rollout mean is checked
  against the trainer's float32 loss);
- the teacher's and the student's top token against the token the student sampled;
- the teacher's probability of the end of sequence;
- on the positions where the student's text so far is the lab's verbose solution (its rollout is still on track),
  the probability each model gives the correct next token, and whether a small gradient step on the student's logits
  at that position (the direction the loss asks for, the teacher fixed) makes the correct token less likely;
- as a control, the same instructed teacher reading the lab's reference solution in its own style.

Positions are labelled by the line of the verbose solution they belong to (`58+67: add the columns from the right.`,
the column lines, the `check:` line, `so 58+67=125`, `\\boxed{125}`, and the end-of-sequence token) and as digits or
not. The same rollouts are measured against the v1 teacher.

    python benchmarks/opsdc_teacher_view.py measure                        # into benchmarks/results/...json
    python benchmarks/opsdc_teacher_view.py render --write docs/opsdc.md   # the docs section, from the JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import write_section  # noqa: E402


RESULTS = ROOT / "benchmarks" / "results" / "opsdc_teacher_view.json"
SECTION = "opsdc-teacher-view"
SPLIT = "test"
INSTRUCTIONS = ("v2", "v1")
SEED = 0
BUCKET = 16
# Line kinds of the lab's verbose solution, in the order they are written, then the end-of-sequence token.
KINDS = ("restatement", "column", "check", "recap", "boxed", "end", "other")
REASONING = ("restatement", "column", "check")
ANSWER = ("recap", "boxed")
# Teacher's end-of-sequence probability above which a position counts as "the teacher would stop here".
STOP_THRESHOLD = 0.5
# Teacher's top-token probability above which a wrong top token counts as "confidently wrong".
CONFIDENT = 0.9
DIGIT_IDS = [ord(str(d)) for d in range(10)]  # byte-level tokenizer: a digit's id is its byte


def line_kind(line: str) -> str:
    """The kind of a line of a completion, by the lab's verbose layout (`verbose_solution` in trl_tip.tasks.lab)."""
    if re.match(r"\d+\+\d+: add the columns", line):
        return "restatement"
    if line.startswith("check:"):
        return "check"
    if line.startswith("so "):
        return "recap"
    if line.startswith("\\boxed"):
        return "boxed"
    if ", carry" in line:
        return "column"
    return "other"


def label_positions(token_ids: list[int], eos_id: int) -> list[tuple[str, bool, str]]:
    """
    For each completion token (byte-level: one character each): the kind of the line it belongs to (a newline belongs
    to the line it ends), whether it is a digit, and the character (`<eos>` for the end of sequence).
    """
    chars = [_char(token, eos_id) for token in token_ids]
    labels: list = [None] * len(chars)
    line: list[int] = []

    def close():
        kind = line_kind("".join(chars[index] for index in line).rstrip("\n"))
        for index in line:
            labels[index] = (kind, chars[index].isdigit(), chars[index])
        line.clear()

    for index, char in enumerate(chars):
        if char == "<eos>":
            close()
            labels[index] = ("end", False, char)
            continue
        line.append(index)
        if char == "\n":
            close()
    close()
    return labels


def result_positions(labels: list[tuple[str, bool, str]]) -> set[int]:
    """The positions of the final sum: the digits after `=` on the recap line and inside `\\boxed{}`."""
    found, seen_equals = set(), False
    for t, (kind, digit, char) in enumerate(labels):
        if kind == "recap":
            seen_equals = seen_equals or char == "="
            if digit and seen_equals:
                found.add(t)
        elif kind == "boxed" and digit:
            found.add(t)
    return found


def _buckets(width: int) -> list[tuple[int, int]]:
    return [(start, min(start + BUCKET, width)) for start in range(0, width, BUCKET)]


def measure() -> dict:
    import torch
    from transformers import set_seed

    sys.path.insert(0, str(ROOT / "examples"))
    from opsdc import BUILTIN_DEFAULTS, load_lab

    from trl_tip import OPSDCConfig, OPSDCTrainer, math_reward
    from trl_tip.tasks.lab import verbose_solution
    from trl_tip.trainers._inputs import model_written_mask
    from trl_tip.trainers._teacher_prompts import TeacherSequence

    torch.set_num_threads(1)
    started = time.perf_counter()
    task = load_lab()
    dataset = task["dataset"]
    rows = [dict(row) for row in dataset[SPLIT]]
    work = Path(tempfile.mkdtemp(prefix="opsdc_teacher_view_"))
    settings = {k: v for k, v in BUILTIN_DEFAULTS.items() if k != "output_dir"}

    results = {"instructions": {}}
    rollouts = None
    for instruction in INSTRUCTIONS:
        config = OPSDCConfig(output_dir=str(work / instruction), concise_instruction=instruction, **settings)
        trainer = OPSDCTrainer(task["teacher"], args=config, train_dataset=dataset["train"],
                               reward_funcs=[math_reward])
        tokenizer = trainer.processing_class
        eos_id = tokenizer.eos_token_id
        trainer.model.train()  # as at the first training step: generation and loss in training mode
        set_seed(SEED)
        output = trainer._generate_and_score_completions(rows)
        if rollouts is None:
            rollouts = output["completion_ids"].clone()
        # Both instructions are measured on the same student rollouts (the student does not see the instruction).
        assert torch.equal(rollouts, output["completion_ids"])
        student = trainer.accelerator.unwrap_model(trainer.model)
        loss, _, _ = trainer._compute_loss(student, output, None)

        # Float64 full logits on the sequences the loss saw.
        width = output["completion_ids"].size(1)
        teacher_sequence = TeacherSequence.of(output)

        def logprobs(model, input_ids, attention_mask, width=width):
            model = copy.deepcopy(trainer.accelerator.unwrap_model(model)).double().eval()
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -width - 1: -1]
            return logits.log_softmax(-1)

        log_s = logprobs(trainer.model, torch.cat([output["prompt_ids"], output["completion_ids"]], 1),
                         torch.cat([output["prompt_mask"], output["completion_mask"]], 1))
        log_t = logprobs(trainer.teacher_model, teacher_sequence.input_ids, teacher_sequence.attention_mask)
        p_s = log_s.exp()
        kl = (p_s * (log_s - log_t)).sum(-1)  # (B, W)
        mask = model_written_mask(output).bool()
        lengths = mask.sum(-1)
        rollout_kl = (kl * mask).sum(-1) / lengths.clamp(min=1)
        float64_loss = rollout_kl[lengths > 0].mean().item()

        ids = output["completion_ids"]
        texts = tokenizer.batch_decode([row[m].tolist() for row, m in zip(ids, mask)], skip_special_tokens=True)
        correct = [bool(r) for r in math_reward(completions=texts, answer=[row["answer"] for row in rows])]
        teacher_top, student_top = log_t.argmax(-1), log_s.argmax(-1)
        teacher_eos, student_eos = log_t[..., eos_id].exp(), log_s[..., eos_id].exp()
        teacher_entropy = -(log_t.exp() * log_t).sum(-1)
        # The loss's gradient on the student's logits z at a position (teacher fixed) is g_k = p_k (log p_k - log q_k -
        # KL); a small step z -= eta g changes log p_y by -eta (g_y - sum_k p_k g_k). `logp_step` is that rate
        # (per unit step): negative where a gradient step makes token y less likely.
        gradient = p_s * (log_s - log_t - kl[..., None])
        logp_step = -(gradient - (p_s * gradient).sum(-1, keepdim=True))
        positions = []
        for i, row in enumerate(rows):
            n = int(lengths[i])
            tokens = ids[i, :n].tolist()
            labels = label_positions(tokens, eos_id)
            a, b = (int(x) for x in row["prompt"][-1]["content"].split("+"))
            reference = [ord(c) for c in verbose_solution(a, b)] + [eos_id]
            on_track = 0
            while on_track < min(n, len(reference)) and tokens[on_track] == reference[on_track]:
                on_track += 1
            # Position t is on track when the text before it is the reference's (so the reference's token is right).
            answer_start = next((t for t, (kind, _, _) in enumerate(labels) if kind in ANSWER + ("end",)), n)
            result = result_positions(labels)
            for t in range(n):
                kind, digit, char = labels[t]
                good = reference[t] if t <= on_track and t < len(reference) else None
                record = {
                    "rollout": i, "t": t, "kind": kind, "digit": digit, "char": char, "level": row["level"],
                    "correct": correct[i], "before_answer": t < answer_start, "result": t in result,
                    "kl": kl[i, t].item(), "teacher_entropy": teacher_entropy[i, t].item(),
                    "teacher_top_is_sampled": bool(teacher_top[i, t] == tokens[t]),
                    "student_top_is_sampled": bool(student_top[i, t] == tokens[t]),
                    "teacher_top_is_student_top": bool(teacher_top[i, t] == student_top[i, t]),
                    "teacher_top": _char(int(teacher_top[i, t]), eos_id),
                    "teacher_eos": teacher_eos[i, t].item(), "student_eos": student_eos[i, t].item(),
                    "teacher_p_sampled": log_t[i, t, tokens[t]].exp().item(),
                    "student_p_sampled": log_s[i, t, tokens[t]].exp().item(),
                    "eos_step": logp_step[i, t, eos_id].item(),
                }
                if good is not None:
                    record["on_track"] = True
                    record["teacher_p_correct"] = log_t[i, t, good].exp().item()
                    record["student_p_correct"] = log_s[i, t, good].exp().item()
                    record["teacher_top_is_correct"] = bool(teacher_top[i, t] == good)
                    record["teacher_confidently_wrong"] = bool(teacher_top[i, t] != good
                                                               and log_t[i, t].max().exp() > CONFIDENT)
                    if good in DIGIT_IDS:
                        # The teacher's mass on the other nine digits: wrong digits it would have the student write.
                        others = [d for d in DIGIT_IDS if d != good]
                        record["teacher_p_other_digits"] = log_t[i, t, others].exp().sum().item()
                        record["student_p_other_digits"] = log_s[i, t, others].exp().sum().item()
                    record["correct_step"] = logp_step[i, t, good].item()
                positions.append(record)
        results["instructions"][instruction] = summarise(positions, lengths.tolist(), correct, width)
        results["instructions"][instruction].update({
            "trainer_loss": loss.item(), "float64_loss": float64_loss,
            "teacher_prompt_example": tokenizer.decode(output["teacher_prompt_ids"][0][
                output["teacher_prompt_mask"][0].bool()]),
            "student_prompt_example": tokenizer.decode(output["prompt_ids"][0][output["prompt_mask"][0].bool()]),
        })
        results["instructions"][instruction]["own_style_control"] = own_style_control(
            trainer, output, rows, instruction)
        del trainer
    results["examples"] = [{"prompt": rows[i]["prompt"][-1]["content"], "completion": _decoded(rollouts[i], eos_id)}
                           for i in range(3)]
    results["settings"] = {
        "model": "the lab's teacher (tests/data/lab), the built-in run's base model", "split": SPLIT,
        "num_prompts": len(rows), "rollouts_per_prompt": 1, "seed": SEED, "bucket": BUCKET,
        "stop_threshold": STOP_THRESHOLD, "confident": CONFIDENT, "temperature": settings.get("temperature", 1.0),
        "max_completion_length": settings["max_completion_length"], "instructions": list(INSTRUCTIONS),
    }
    results["wall_seconds"] = time.perf_counter() - started
    results["measured"] = time.strftime("%Y-%m-%d")
    return results


def own_style_control(trainer, output: dict, rows: list[dict], instruction: str) -> dict:
    """
    The same instructed teacher (float64) reading, after its own prompt, the lab's reference solution in the style it
    was trained to write under this instruction (`solution_for`), instead of the student's verbose rollout: how often
    its top token is the reference's next token, and the probability it gives it. Separates "the instructed teacher
    cannot do the arithmetic" from "it cannot read the verbose style".
    """
    import torch

    from trl_tip.tasks.lab import solution_for

    tokenizer = trainer.processing_class
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    teacher = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.teacher_model)).double().eval()
    sequences, references = [], []
    for i, row in enumerate(rows):
        prompt = output["teacher_prompt_ids"][i][output["teacher_prompt_mask"][i].bool()].tolist()
        a, b = (int(x) for x in row["prompt"][-1]["content"].split("+"))
        reference = [ord(c) for c in solution_for(a, b, instruction)] + [eos_id]
        sequences.append(prompt + reference)
        references.append(reference)
    width = max(map(len, sequences))
    ids = torch.tensor([[pad_id] * (width - len(seq)) + seq for seq in sequences])
    mask = torch.tensor([[0] * (width - len(seq)) + [1] * len(seq) for seq in sequences])
    with torch.no_grad():
        log_t = teacher(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
    top, p_correct, digit_top, digits = 0, 0.0, 0, 0
    for i, reference in enumerate(references):
        n = len(reference)
        scores = log_t[i, width - n - 1: width - 1]
        targets = torch.tensor(reference)
        hits = scores.argmax(-1) == targets
        top += int(hits.sum())
        p_correct += scores.gather(-1, targets[:, None]).exp().sum().item()
        is_digit = torch.tensor([token in DIGIT_IDS for token in reference])
        digit_top += int(hits[is_digit].sum())
        digits += int(is_digit.sum())
    positions = sum(map(len, references))
    return {"positions": positions, "teacher_top_is_correct": top / positions,
            "teacher_p_correct_mean": p_correct / positions, "digit_positions": digits,
            "teacher_top_is_correct_digits": digit_top / digits,
            "mean_length": positions / len(references)}


def _char(token: int, eos_id: int) -> str:
    return "<eos>" if token == eos_id else (chr(token) if token < 256 else f"<{token}>")


def _decoded(ids, eos_id: int) -> str:
    return "".join(_char(int(t), eos_id) for t in ids if int(t) < 256 or int(t) == eos_id)


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _group(positions: list[dict]) -> dict:
    """Summary of a set of positions."""
    on_track = [p for p in positions if p.get("on_track")]
    return {
        "positions": len(positions),
        "kl_sum": sum(p["kl"] for p in positions),
        "kl_mean": _mean(p["kl"] for p in positions),
        "teacher_top_is_sampled": _mean(p["teacher_top_is_sampled"] for p in positions),
        "student_top_is_sampled": _mean(p["student_top_is_sampled"] for p in positions),
        "teacher_top_is_student_top": _mean(p["teacher_top_is_student_top"] for p in positions),
        "teacher_eos_mean": _mean(p["teacher_eos"] for p in positions),
        "teacher_eos_max": max((p["teacher_eos"] for p in positions), default=None),
        "teacher_would_stop": _mean(p["teacher_eos"] > STOP_THRESHOLD for p in positions),
        "student_eos_mean": _mean(p["student_eos"] for p in positions),
        "teacher_p_sampled_mean": _mean(p["teacher_p_sampled"] for p in positions),
        "student_p_sampled_mean": _mean(p["student_p_sampled"] for p in positions),
        "eos_raised": _mean(p["eos_step"] > 0 for p in positions),
        "on_track_positions": len(on_track),
        "teacher_p_correct_mean": _mean(p["teacher_p_correct"] for p in on_track),
        "student_p_correct_mean": _mean(p["student_p_correct"] for p in on_track),
        "teacher_top_is_correct": _mean(p["teacher_top_is_correct"] for p in on_track),
        "teacher_confidently_wrong": _mean(p["teacher_confidently_wrong"] for p in on_track),
        "teacher_entropy_mean": _mean(p["teacher_entropy"] for p in positions),
        "on_track_digit_positions": sum(1 for p in on_track if "teacher_p_other_digits" in p),
        "teacher_p_other_digits_mean": _mean(p["teacher_p_other_digits"] for p in on_track
                                             if "teacher_p_other_digits" in p),
        "student_p_other_digits_mean": _mean(p["student_p_other_digits"] for p in on_track
                                             if "student_p_other_digits" in p),
        "correct_lowered": _mean(p["correct_step"] < 0 for p in on_track),
    }


def summarise(positions: list[dict], lengths: list[int], correct: list[bool], width: int) -> dict:
    total_kl = sum(p["kl"] for p in positions)
    # Each rollout's share of the loss is its mean KL / N: a position's weight is 1 / (N · |y_i|).
    n_rollouts = sum(1 for n in lengths if n > 0)
    for p in positions:
        p["loss_share"] = p["kl"] / (n_rollouts * lengths[p["rollout"]])
    loss = sum(p["loss_share"] for p in positions)

    def share(selected):
        return sum(p["loss_share"] for p in selected) / loss if loss else None

    by_kind = {kind: {**_group([p for p in positions if p["kind"] == kind]),
                      "loss_share": share([p for p in positions if p["kind"] == kind])}
               for kind in KINDS if any(p["kind"] == kind for p in positions)}
    groups = {
        "reasoning": [p for p in positions if p["kind"] in REASONING],
        "answer": [p for p in positions if p["kind"] in ANSWER],
        "end": [p for p in positions if p["kind"] == "end"],
        "other": [p for p in positions if p["kind"] == "other"],
        "digits": [p for p in positions if p["digit"]],
        "non_digits": [p for p in positions if not p["digit"]],
        "reasoning_digits": [p for p in positions if p["digit"] and p["kind"] in REASONING],
        "answer_digits": [p for p in positions if p["digit"] and p["kind"] in ANSWER],
        "result_digits": [p for p in positions if p["result"]],
        "before_answer": [p for p in positions if p["before_answer"]],
    }
    by_group = {name: {**_group(selected), "loss_share": share(selected)} for name, selected in groups.items()}
    by_level = {str(level): {**_group([p for p in positions if p["level"] == level]),
                             "loss_share": share([p for p in positions if p["level"] == level])}
                for level in sorted({p["level"] for p in positions})}
    by_outcome = {}
    for name, flag in (("correct", True), ("wrong", False)):
        selected = [p for p in positions if p["correct"] == flag]
        rollout_ids = {p["rollout"] for p in selected}
        by_outcome[name] = {
            "rollouts": sum(1 for c, n in zip(correct, lengths) if c == flag and n > 0),
            "mean_length": _mean(n for c, n in zip(correct, lengths) if c == flag and n > 0),
            "mean_rollout_kl": _mean(sum(p["kl"] for p in selected if p["rollout"] == r) / lengths[r]
                                     for r in rollout_ids),
            "loss_share": share(selected),
            **{f"{group}_loss_share_within": (sum(p["loss_share"] for p in selected if p["kind"] in kinds)
                                              / sum(p["loss_share"] for p in selected)) if selected else None
               for group, kinds in (("reasoning", REASONING), ("answer", ANSWER), ("end", ("end",)))},
        }
    by_bucket = []
    for start, end in _buckets(width):
        selected = [p for p in positions if start <= p["t"] < end]
        by_bucket.append({"start": start, "end": end, **_group(selected), "loss_share": share(selected)})
    # Per rollout: the teacher's end-of-sequence mass before the answer starts, and the chance that the teacher,
    # reading the student's tokens, would not have stopped before the answer (prod of 1 - p_eos).
    per_rollout = []
    for r, n in enumerate(lengths):
        before = [p for p in positions if p["rollout"] == r and p["before_answer"]]
        if not before:
            continue
        survive = 1.0
        for p in before:
            survive *= 1.0 - p["teacher_eos"]
        per_rollout.append({"eos_mass_before_answer": sum(p["teacher_eos"] for p in before),
                            "teacher_survives_to_answer": survive, "positions_before_answer": len(before)})
    # What the teacher wants instead, where its top token is not the sampled one.
    swaps: dict[str, dict[str, int]] = {}
    for p in positions:
        if not p["teacher_top_is_sampled"]:
            kind_swaps = swaps.setdefault(p["kind"], {})
            key = f"{p['char']} -> {p['teacher_top']}"
            kind_swaps[key] = kind_swaps.get(key, 0) + 1
    top_swaps = {kind: sorted(counts.items(), key=lambda item: -item[1])[:8] for kind, counts in swaps.items()}
    return {
        "rollouts": n_rollouts,
        "accuracy": _mean(correct),
        "mean_length": _mean(lengths),
        "total_kl": total_kl,
        "all": _group(positions),
        "by_kind": by_kind,
        "by_group": by_group,
        "by_outcome": by_outcome,
        "by_level": by_level,
        "by_bucket": by_bucket,
        "eos_before_answer": {
            "mean_mass": _mean(r["eos_mass_before_answer"] for r in per_rollout),
            "max_mass": max((r["eos_mass_before_answer"] for r in per_rollout), default=None),
            "mean_survival": _mean(r["teacher_survives_to_answer"] for r in per_rollout),
            "min_survival": min((r["teacher_survives_to_answer"] for r in per_rollout), default=None),
            "rollouts": len(per_rollout),
        },
        "teacher_top_swaps": top_swaps,
    }


# --- rendering -------------------------------------------------------------------------------------------------------


KIND_LABELS = {
    "restatement": "`58+67: add the columns from the right.`",
    "column": "column lines (`8+7=15, carry 1`)",
    "check": "`check: 8+7=15, 5+6+1=12`",
    "recap": "`so 58+67=125`",
    "boxed": "`\\boxed{125}`",
    "end": "end of sequence",
    "other": "other lines",
}
GROUP_LABELS = {
    "reasoning": "reasoning (the first three)",
    "answer": "answer (`so …` and `\\boxed{}`)",
    "digits": "all digits",
    "result_digits": "the final sum's digits",
}


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f} %"


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _sci(value: float) -> str:
    return f"{value:.1e}".replace("e-0", "e-")


def eos_verdict(view: dict) -> str:
    """Whether the teacher asks the student to stop before its answer, from the measured end-of-sequence mass."""
    eos = view["eos_before_answer"]
    if eos["mean_mass"] < 0.05 and eos["min_survival"] > 0.9:
        return (f"The teacher does not ask the student to stop early. Before the answer line its end-of-sequence "
                f"probability sums to {eos['mean_mass']:.4f} per rollout on average (at most "
                f"{eos['max_mass']:.4f}), so a teacher reading the student's tokens would reach the answer with "
                f"probability {eos['mean_survival']:.4f} on average (at least {eos['min_survival']:.4f}); its "
                f"end-of-sequence mass sits where the student ends, after `\\boxed{{}}` (mean "
                f"{view['by_kind']['end']['teacher_eos_mean']:.4f} there). The loss carries no signal to end early or "
                "to drop the answer.")
    return (f"The teacher asks the student to stop early. Before the answer line its end-of-sequence probability "
            f"sums to {eos['mean_mass']:.3f} per rollout on average, and a teacher reading the student's tokens would "
            f"reach the answer with probability {eos['mean_survival']:.3f} on average: the reverse KL pushes the "
            "student to end before it writes its answer.")


def section(results: dict) -> str:
    settings = results["settings"]
    views = results["instructions"]
    names = settings["instructions"]
    main = views[names[0]]
    header = "| | " + " | ".join(f"teacher {name}" for name in names) + " |"
    rule = "|---|" + "---:|" * len(names)

    def row(label, value):
        return f"| {label} | " + " | ".join(value(views[name]) for name in names) + " |"

    lines = [
        f"Data: `benchmarks/results/opsdc_teacher_view.json`, written by `benchmarks/opsdc_teacher_view.py` "
        f"({results['measured']}). Step 0 of the built-in run: the lab's base model, one rollout per "
        f"{settings['split']} prompt ({settings['num_prompts']} prompts, T = {settings['temperature']:g}, ≤ "
        f"{settings['max_completion_length']} tokens, seed {settings['seed']}), drawn by the trainer's own "
        "generation, "
        f"which also builds the teacher's prompts. The sampled rollouts are {_pct(main['accuracy'])} correct, "
        f"{main['mean_length']:.1f} tokens long on average. Both models are run again in float64 on the sequences the "
        f"loss sees; their mean over rollouts of each rollout's mean reverse KL is "
        + ", ".join(f"{views[n]['float64_loss']:.4f} ({n})" for n in names)
        + ", and the trainer's own loss on the same batch is "
        + ", ".join(f"{views[n]['trainer_loss']:.4f}" for n in names)
        + ". A position is *on track* when the student's text before it is the lab's verbose solution character for "
        "character, so the correct next token is known "
        f"({main['all']['on_track_positions']:,} of {main['all']['positions']:,} positions). The tokenizer is "
        f"byte-level: a token is a character. The measurement took {results['wall_seconds']:.0f} s of wall time on "
        "one CPU thread.",
        "",
        header,
        rule,
        row("mean reverse KL per token (nats)", lambda v: _num(v["all"]["kl_mean"])),
        row("teacher's top token = the student's sampled token", lambda v: _pct(v["all"]["teacher_top_is_sampled"])),
        row("student's top token = its sampled token", lambda v: _pct(v["all"]["student_top_is_sampled"])),
        row("on track: the teacher's top token is the correct one",
            lambda v: _pct(v["all"]["teacher_top_is_correct"])),
        row(f"on track: … and the teacher is confidently wrong (top token wrong, at p > {settings['confident']:g})",
            lambda v: _pct(v["all"]["teacher_confidently_wrong"])),
        row("on track: probability of the correct token, teacher / student",
            lambda v: f"{_num(v['all']['teacher_p_correct_mean'], 3)} / "
                      f"{_num(v['all']['student_p_correct_mean'], 3)}"),
        row("teacher's mean entropy (nats)", lambda v: _num(v["all"]["teacher_entropy_mean"], 3)),
        row("on-track digits: mass on the nine wrong digits, teacher / student",
            lambda v: f"{_pct(v['all']['teacher_p_other_digits_mean'])} / "
                      f"{_pct(v['all']['student_p_other_digits_mean'], 2)}"),
        row("… on the final sum's digits, teacher / student",
            lambda v: f"{_pct(v['by_group']['result_digits']['teacher_p_other_digits_mean'])} / "
                      f"{_pct(v['by_group']['result_digits']['student_p_other_digits_mean'], 2)}"),
        row("on track: a gradient step on the student's logits lowers the correct token's probability",
            lambda v: _pct(v["all"]["correct_lowered"])),
        row("teacher's end-of-sequence mass before the answer line, per rollout: mean / max",
            lambda v: f"{v['eos_before_answer']['mean_mass']:.4f} / {v['eos_before_answer']['max_mass']:.4f}"),
        row(f"positions before the answer where the teacher's end-of-sequence probability > "
            f"{settings['stop_threshold']:g}", lambda v: _pct(v["by_group"]["before_answer"]["teacher_would_stop"])),
        row("control: the same teacher on the reference solution of its own style, top token correct (digits)",
            lambda v: f"{_pct(v['own_style_control']['teacher_top_is_correct'])} "
                      f"({_pct(v['own_style_control']['teacher_top_is_correct_digits'])})"),
        "",
        "Where the loss is, by line of the student's verbose solution (share of the loss: the position's share of the "
        "mean over rollouts of each rollout's mean KL; on track: the teacher's top token is the correct one; "
        "lowered: a gradient step on the student's logits lowers the correct token's probability):",
        "",
        "| line | positions | " + " | ".join(f"{n}: mean KL | {n}: share of the loss | {n}: on track, teacher "
                                          f"correct | {n}: lowered" for n in names) + " |",
        "|---|---:|" + "---:|---:|---:|---:|" * len(names),
    ]

    def cells(name, group):
        g = group(views[name])
        if g is None:
            return "– | – | – | –"
        return (f"{_num(g['kl_mean'])} | {_pct(g['loss_share'])} | {_pct(g['teacher_top_is_correct'])} | "
                f"{_pct(g['correct_lowered'])}")

    for kind in KINDS:
        if kind not in main["by_kind"]:
            continue
        lines.append(f"| {KIND_LABELS[kind]} | {main['by_kind'][kind]['positions']:,} | "
                     + " | ".join(cells(n, lambda v, kind=kind: v["by_kind"].get(kind)) for n in names) + " |")
    for group, label in GROUP_LABELS.items():
        lines.append(f"| {label} | {main['by_group'][group]['positions']:,} | "
                     + " | ".join(cells(n, lambda v, group=group: v["by_group"][group]) for n in names) + " |")
    lines += [
        "",
        f"By position in the completion ({settings['bucket']}-token buckets):",
        "",
        "| positions | " + " | ".join(f"{n}: mean KL | {n}: share of the loss | {n}: teacher's top = sampled | "
                                     f"{n}: teacher's P(end)" for n in names) + " |",
        "|---|" + "---:|---:|---:|---:|" * len(names),
    ]
    for index, bucket in enumerate(main["by_bucket"]):
        lines.append(
            f"| {bucket['start']}–{bucket['end'] - 1} | " + " | ".join(
                f"{_num(views[n]['by_bucket'][index]['kl_mean'])} | {_pct(views[n]['by_bucket'][index]['loss_share'])}"
                f" | {_pct(views[n]['by_bucket'][index]['teacher_top_is_sampled'])} | "
                f"{_num(views[n]['by_bucket'][index]['teacher_eos_mean'], 4)}" for n in names) + " |")
    lines += [
        "",
        "Correct and wrong rollouts (graded as `opsdc/accuracy` grades them):",
        "",
        "| rollouts | count | mean length | " + " | ".join(
            f"{n}: mean rollout KL | {n}: share of the loss | {n}: of it on reasoning / answer / end" for n in names)
        + " |",
        "|---|---:|---:|" + "---:|---:|---:|" * len(names),
    ]
    for outcome in ("correct", "wrong"):
        o = main["by_outcome"][outcome]
        lines.append(
            f"| {outcome} | {o['rollouts']} | {_num(o['mean_length'], 1)} | " + " | ".join(
                f"{_num(views[n]['by_outcome'][outcome]['mean_rollout_kl'])} | "
                f"{_pct(views[n]['by_outcome'][outcome]['loss_share'])} | "
                f"{_pct(views[n]['by_outcome'][outcome]['reasoning_loss_share_within'])} / "
                f"{_pct(views[n]['by_outcome'][outcome]['answer_loss_share_within'])} / "
                f"{_pct(views[n]['by_outcome'][outcome]['end_loss_share_within'], 2)}" for n in names) + " |")
    swaps = main["teacher_top_swaps"]
    lines += [
        "",
        f"What the {names[0]} teacher predicts instead, where its top token is not the student's (sampled → teacher's "
        "top, most frequent first; `⏎` is a newline, `␣` a space):",
        "",
        "| line | " + " | ".join(["most frequent"] * 3) + " |",
        "|---|---|---|---|",
    ]
    for kind in KINDS:
        if kind in swaps and swaps[kind]:
            top = [f"`{_visible(pair)}` ({count})" for pair, count in swaps[kind][:3]]
            lines.append(f"| {KIND_LABELS[kind]} | " + " | ".join(top + ["–"] * (3 - len(top))) + " |")
    lines += ["", *_diagnosis(results)]
    return "\n".join(lines) + "\n"


def _outcome_sentence(view: dict) -> str:
    correct, wrong = view["by_outcome"]["correct"], view["by_outcome"]["wrong"]
    if not wrong["rollouts"]:
        return "No sampled rollout was wrong."
    alike = abs(wrong["mean_rollout_kl"] - correct["mean_rollout_kl"]) <= 0.25 * correct["mean_rollout_kl"]
    return (f"Correct and wrong rollouts are pulled {'alike' if alike else 'differently'} (mean rollout KL "
            f"{correct['mean_rollout_kl']:.2f} nats over {correct['rollouts']} correct rollouts, "
            f"{wrong['mean_rollout_kl']:.2f} over {wrong['rollouts']} wrong ones).")


def _visible(pair: str) -> str:
    sampled, top = pair.split(" -> ")
    show = {"\n": "⏎", " ": "␣", "`": "'"}
    return f"{show.get(sampled, sampled)} → {show.get(top, top)}"


def _diagnosis(results: dict) -> list[str]:
    settings = results["settings"]
    names = settings["instructions"]
    views = results["instructions"]
    main = views[names[0]]
    groups, kinds = main["by_group"], main["by_kind"]
    control = main["own_style_control"]
    wrong_teacher = main["all"]["teacher_top_is_correct"] < 0.9
    lines = [
        "**Diagnosis.** " + eos_verdict(main),
        "",
    ]
    if wrong_teacher:
        lines.append(
            f"**It is the teacher's view of the student's tokens: it contradicts them, confidently, where they are "
            f"right.** On positions where the student is still writing the correct verbose solution, the "
            f"{names[0]} teacher's top token is the correct one at "
            f"{_pct(main['all']['teacher_top_is_correct'])} of positions "
            + "(" + ", ".join(f"{_pct(views[n]['all']['teacher_top_is_correct'])} for {n}" for n in names[1:])
            + f"); at {_pct(main['all']['teacher_confidently_wrong'])} of them its top token is wrong at p > "
            f"{settings['confident']:g} (mean entropy "
            f"{main['all']['teacher_entropy_mean']:.2f} nats: not unsure, sure of something else). On digits it puts "
            f"{_pct(main['all']['teacher_p_other_digits_mean'])} of its mass on the nine wrong digits, "
            f"{_pct(groups['result_digits']['teacher_p_other_digits_mean'])} on the final sum's digits, where the "
            f"student puts {_pct(main['all']['student_p_other_digits_mean'], 2)} "
            f"({_pct(groups['result_digits']['student_p_other_digits_mean'], 2)}). Reverse KL at a position pulls "
            f"the student's next-token distribution towards the teacher's, so a gradient step on the student's logits "
            f"lowers the probability of "
            f"the correct token at {_pct(main['all']['correct_lowered'])} of on-track positions "
            f"({_pct(groups['digits']['correct_lowered'])} of digits, "
            f"{_pct(groups['result_digits']['correct_lowered'])} of the final sum's digits).")
        lines += [
            "",
            f"The arithmetic is not what the teacher lacks: reading the reference solution in its own style after the "
            f"same prompt, its top token is the correct one at {_pct(control['teacher_top_is_correct'])} of positions "
            f"({_pct(control['teacher_top_is_correct_digits'])} of digits). What it lacks is a view of the verbose "
            "style: the lab's base model was only ever trained to write the concise style under an instruction, so "
            "under the instruction it reads the student's text as a malformed concise solution and predicts that "
            "solution's next character (the table above).",
            "",
            f"The loss is not on the answer so much as on everything before it: "
            f"{_pct(groups['reasoning']['loss_share'])} of it comes from the reasoning lines "
            f"({_pct(kinds['restatement']['loss_share'])} from the restatement line alone, the line the concise style "
            f"omits), {_pct(groups['answer']['loss_share'])} from the answer lines, "
            f"a share of {_sci(kinds['end']['loss_share'])} from the end of sequence; digits carry "
            f"{_pct(groups['digits']['loss_share'])}, the final sum's digits "
            f"{_pct(groups['result_digits']['loss_share'])}. {_outcome_sentence(main)}",
            "",
            "So the first thing a gradient step changes is the student's certainty about the tokens its answer "
            "depends on, towards digits and separators the teacher would write in another layout; nothing in the "
            "signal shortens the verbose layout as a whole (no end-of-sequence mass before the answer, only "
            "character-by-character substitutions inside lines the student keeps writing). That is the order the grid "
            "above measured, accuracy eroding while the length holds; this measurement is at step 0 and does not "
            "trace the later fall in length. On the lab the cause is the teacher's view, which the base model's "
            "training made blind to the student's style, not the loss path (identical views give exactly zero loss "
            "and gradient, tested); whether a large model reads its own verbose reasoning this badly under a "
            "conciseness instruction is not measured here.",
        ]
    else:
        lines.append(
            f"The teacher mostly agrees with the student's correct tokens: its top token is the correct one at "
            f"{_pct(main['all']['teacher_top_is_correct'])} of on-track positions.")
    return lines


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("measure", "render"))
    parser.add_argument("--write", default=None, help="markdown file whose opsdc-teacher-view section is rewritten")
    return parser


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    if args.mode == "measure":
        results = measure()
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    else:
        results = json.loads(RESULTS.read_text())
    text = section(results)
    print(text)
    if args.write:
        write_section(args.write, SECTION, text)


if __name__ == "__main__":
    main()
