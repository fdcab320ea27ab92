"""
How much a served teacher moves the tokens TIP keeps: the kept set of each rule computed from the teacher's top-k
log-probs plus a tail bucket (what `trl vllm-serve` returns, `loss_top_k = k`) against the kept set from the full
vocabulary of the same teacher held locally, on the lab task's shipped pair (tests/data/lab).

The student samples rollouts of lab training prompts (temperature 1, up to 128 tokens); for each micro-batch the local
teacher's log-probs are truncated to their top k (plus the log-prob of the completion's token), which is exactly what
the server returns, and each rule selects on both. Reported: overlap = |kept locally ∩ kept from top-k| / |kept
locally| (both keep the same number of tokens per rollout), for k = 1, 8, 64 (the vocabulary has 259 tokens).

With `--teacher_model_server_url` (a `trl vllm-serve --model tests/data/lab/.../teacher --dtype float32` of the lab
teacher; needs the vLLM environment), the same batches are also scored by the real server and the kept sets from its
answers compared with the offline truncation.

    python benchmarks/served_selection.py --write docs/tip_distill.md
    python benchmarks/served_selection.py --load benchmarks/results/served_selection.json --write docs/tip_distill.md
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, command_line, load_json, save_json, versions, write_section  # noqa: E402


RESULTS = ROOT / "benchmarks" / "results" / "served_selection.json"
LAB = ROOT / "tests" / "data" / "lab" / "lab-v4-n1500-30-60-seed0"
# A rule, or a rule and its `selection_divergence` ("soft_or:jsd": soft-OR on the bounded JSD / ln 2).
METHODS = ("soft_or", "soft_or:jsd", "divergence_topk", "overconfident", "entropy_topk")
TOP_KS = (1, 8, 64)
RATIOS = (0.5, 0.2)


def rollouts(student, tokenizer, prompts, batch_size: int, max_tokens: int, seed: int) -> list[dict]:
    """The student's sampled completions, in micro-batches of TRL's layout (prompt left-, completion right-padded)."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    batches = []
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start : start + batch_size]
        ids = [torch.tensor(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"]) for p in rows]
        prompt_ids = pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_token_id, padding_side="left")
        prompt_mask = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_side="left")
        with torch.no_grad():
            out = student.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=1.0,
                                   top_k=0, top_p=1.0, max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id)
        completion_ids = out[:, prompt_ids.size(1) :]
        is_eos = completion_ids == eos
        after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
        completion_mask = (~after_eos).long()
        completion_ids = completion_ids.masked_fill(after_eos, tokenizer.pad_token_id)
        batches.append({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                        "completion_mask": completion_mask})
    return batches


def last_hidden(model, batch):
    """The hidden states before the `lm_head` that predict each completion token."""
    import torch

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    length = batch["completion_ids"].size(1)
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    return hidden[:, -length - 1 : -1]


def kept_sets(batch, student, teacher, served_by_k: dict, methods, ratios, seed: int) -> dict:
    """`(method, ratio, source) -> keep` for source "local" and each k of `served_by_k` (`ServedTeacherLogprobs`)."""
    import torch

    from trl_tip.losses import selective_divergence_loss
    from trl_tip.served_loss import selective_sparse_divergence_loss

    with torch.no_grad():
        s_hidden, t_hidden = last_hidden(student, batch), last_hidden(teacher, batch)
        w_s, w_t = student.lm_head.weight, teacher.lm_head.weight
        mask = batch["completion_mask"]
        kept = {}
        for name in methods:
            method, _, divergence = name.partition(":")
            rule = {"method": method, "selection_divergence": divergence or "reverse_kl"}
            for ratio in ratios:
                local = selective_divergence_loss(s_hidden, t_hidden, w_s, w_t, mask, 1.0, **rule, ratio=ratio,
                                                  generator=torch.Generator().manual_seed(seed))
                kept[(name, ratio, "local")] = local.keep
                for k, served in served_by_k.items():
                    sparse = selective_sparse_divergence_loss(s_hidden, w_s, batch["completion_ids"], mask, served,
                                                              1.0, **rule, ratio=ratio,
                                                              generator=torch.Generator().manual_seed(seed))
                    kept[(name, ratio, k)] = sparse.keep
    return kept


def truncated(teacher, batch, k: int):
    """What a server returns for `batch` at `loss_top_k = k`, from the local teacher: top-k and the sampled token."""
    import torch

    from trl_tip.served_loss import ServedTeacherLogprobs

    with torch.no_grad():
        logprobs = (last_hidden(teacher, batch) @ teacher.lm_head.weight.T).float().log_softmax(-1)
    top = logprobs.topk(k, dim=-1)
    sampled = logprobs.gather(-1, batch["completion_ids"][..., None])[..., 0]
    return ServedTeacherLogprobs(top.indices, top.values, sampled), logprobs


def run(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_tip.tasks.lab import LAB_MAX_COMPLETION_TOKENS, build_lab_dataset

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(LAB / "student")
    student = AutoModelForCausalLM.from_pretrained(LAB / "student").eval()
    teacher = AutoModelForCausalLM.from_pretrained(LAB / "teacher").eval()
    prompts = build_lab_dataset()["train"].select(range(args.prompts))["prompt"]
    batches = rollouts(student, tokenizer, prompts, args.batch_size, LAB_MAX_COMPLETION_TOKENS, args.seed)
    served = None
    if args.teacher_model_server_url:
        from trl_tip.served_teacher import ServedTeacher

        served = ServedTeacher(args.teacher_model_server_url)
        served.check_tokenizer(tokenizer)
    counts, server_counts, server_error, with_entropy = {}, {}, {k: 0.0 for k in TOP_KS}, {}
    for batch in batches:
        offline = {k: truncated(teacher, batch, k) for k in TOP_KS}
        kept = kept_sets(batch, student, teacher, {k: value[0] for k, value in offline.items()}, METHODS, RATIOS,
                         args.seed)
        for (method, ratio, source), keep in kept.items():
            if source == "local":
                # How much of what the rule keeps (local teacher) `entropy_topk` keeps too: the share decided by
                # the student's entropy, which a served teacher leaves exact.
                total = with_entropy.setdefault(f"{method}|{ratio}", [0, 0])
                total[0] += int((keep & kept[("entropy_topk", ratio, "local")]).sum())
                total[1] += int(keep.sum())
                continue
            local = kept[(method, ratio, "local")]
            total = counts.setdefault(f"{method}|{ratio}|{source}", [0, 0])
            total[0] += int((local & keep).sum())
            total[1] += int(local.sum())
        if served is not None:
            answers = {k: served.sequence_logprobs(batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                                                   batch["completion_mask"], top_k=k, temperature=1.0, step=0)
                       for k in TOP_KS}
            mask = batch["completion_mask"].bool()
            for k, answer in answers.items():
                local_values = offline[k][1][mask].gather(-1, answer.topk_ids[mask])
                error = (answer.topk_logprobs[mask] - local_values).abs().max().item()
                server_error[k] = max(server_error[k], error)
            from_server = kept_sets(batch, student, teacher, answers, METHODS, RATIOS, args.seed)
            for (method, ratio, source), keep in from_server.items():
                if source == "local":
                    continue
                total = server_counts.setdefault(f"{method}|{ratio}|{source}", [0, 0])
                offline_keep = kept[(method, ratio, source)]
                total[0] += int((offline_keep & keep).sum())
                total[1] += int(offline_keep.sum())
    completion_tokens = sum(int(batch["completion_mask"].sum()) for batch in batches)
    return {
        "measured": time.strftime("%Y-%m-%d"),
        "command": command_line(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": versions(vllm=served is not None),
        "pair": str(LAB.relative_to(ROOT)),
        "prompts": args.prompts,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "completion_tokens": completion_tokens,
        "vocabulary": len(tokenizer),
        "top_ks": list(TOP_KS),
        "ratios": list(RATIOS),
        "methods": list(METHODS),
        "overlap": {key: value[0] / value[1] for key, value in counts.items()},
        "local_overlap_with_entropy_topk": {key: value[0] / value[1] for key, value in with_entropy.items()},
        "server_check": None if served is None else {
            "url_model": served.model,
            "agreement": {key: value[0] / value[1] for key, value in server_counts.items()},
            "max_logprob_difference": server_error,
        },
    }


def table(results: dict) -> str:
    ks = results["top_ks"]
    lines = ["| rule | kept fraction ρ | " + " | ".join(f"overlap at k = {k}" for k in ks)
             + " | local teacher: also kept by `entropy_topk` |", "|---|---:|" + "---:|" * (len(ks) + 1)]
    for method in results["methods"]:
        for ratio in results["ratios"]:
            cells = [f"{100 * results['overlap'][f'{method}|{ratio}|{k}']:.1f} %" for k in ks]
            rule, _, divergence = method.partition(":")
            label = f"`{rule}`" + (f" (`selection_divergence={divergence!r}`)" if divergence else "")
            shared = results["local_overlap_with_entropy_topk"][f"{method}|{ratio}"]
            lines.append(f"| {label} | {ratio} | " + " | ".join(cells) + f" | {100 * shared:.1f} % |")
    return "\n".join(lines)


def server_text(results: dict) -> str:
    check = results["server_check"]
    if check is None:
        return "The real server was not queried in this run.\n"
    agreement = check["agreement"]
    worst = min(agreement.values())
    errors = ", ".join(f"{value:.1e} at k = {k}" for k, value in check["max_logprob_difference"].items())
    agree = ("the same kept sets as the offline truncation, for every rule, ratio and k" if worst == 1.0 else
             f"kept sets that agree with the offline truncation on at least {100 * worst:.1f} % of the kept tokens, "
             "for every rule, ratio and k")
    return (
        f"Check against the real server (`trl vllm-serve` of the lab teacher, float32, vLLM "
        f"{results['versions'].get('vllm')}): the same batches scored by the server give {agree} (largest "
        f"difference between the server's and the local teacher's log-probs: {errors}).\n"
    )


def section(results: dict) -> str:
    return (
        f"Measured {results['measured']} with `{results['command']}` ({results['machine']}, Python "
        f"{results['versions']['python']}, torch {results['versions']['torch']}) on the lab pair "
        f"(`{results['pair']}`, vocabulary {results['vocabulary']}): {results['prompts']} training prompts, one "
        f"rollout each by the student (temperature 1), {results['completion_tokens']} completion tokens, "
        f"micro-batches of {results['batch_size']} rollouts, reverse KL (β = 1). Overlap = share of the tokens kept "
        "with the local full-vocabulary teacher that are also kept from the top-k log-probs plus a tail bucket; the "
        "last column: share of the tokens the rule keeps with the local teacher that `entropy_topk` keeps too. Data: "
        "`benchmarks/results/served_selection.json`.\n\n" + table(results) + "\n\n" + server_text(results)
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher_model_server_url", default=None,
                        help="a `trl vllm-serve` of the lab teacher, to check the offline truncation against")
    parser.add_argument("--load", default=None, help="render results saved earlier instead of measuring")
    parser.add_argument("--write", default=None, help="markdown file whose served-selection section is (re)written")
    args = parser.parse_args()
    if args.load:
        results = load_json(args.load)
    else:
        results = run(args)
        save_json(RESULTS, results)
    print(table(results))
    print(server_text(results))
    if args.write:
        write_section(args.write, "served-selection", section(results))


if __name__ == "__main__":
    main()
