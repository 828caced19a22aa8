"""Near-duplicate filter speed: rouge-score all-pairs (what Alpaca's script does) vs RougeIndex.

Candidates are real short texts: chitchat utterances of 4-40 words (chitchat-dataset from
PyPI, see ../shared/docs/ASSETS.md), in file order, filtered against a pool that starts with
the shipped seed instructions and grows with every kept candidate (ROUGE-L >= 0.7 with any
pool item: dropped). Both filters must make the same decisions; the naive pass can be cut
to the first --naive-limit candidates (its time is then also extrapolated to all of them by
the number of pairs it would score, which is counted exactly).

    python benchmarks/rouge_filter.py --num 10000 --naive-limit 2000
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib.metadata import distribution
from pathlib import Path

from llamaforge.synth.rouge import RougeIndex, rouge_tokens
from llamaforge.synth.self_instruct import SEED_TASKS, read_seed_tasks


def candidates(num: int) -> list[str]:
    """The first `num` chitchat utterances of 4 to 40 words."""
    path = distribution("chitchat-dataset").locate_file("chitchat_dataset/dataset.json")
    out: list[str] = []
    for convo in json.loads(Path(path).read_text()).values():
        for turn in convo["messages"]:
            for msg in turn:
                if 4 <= len(msg["text"].split()) <= 40:
                    out.append(msg["text"])
                    if len(out) == num:
                        return out
    return out


def fast_filter(seeds: list[str], cands: list[str], threshold: float):
    """RougeIndex: keep flags, wall seconds, CPU seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    index = RougeIndex(seeds)
    keep = []
    for c in cands:
        ok = index.max_score(c, threshold)[0] < threshold
        keep.append(ok)
        if ok:
            index.add(c)
    return keep, time.perf_counter() - t0, time.process_time() - c0


def naive_filter(seeds: list[str], cands: list[str], threshold: float):
    """rouge-score against every pool item (all pairs, then the max): flags, wall and CPU
    seconds, pairs scored."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    t0, c0 = time.perf_counter(), time.process_time()
    pool, keep, pairs = list(seeds), [], 0
    for c in cands:
        scores = [scorer.score(p, c)["rougeL"].fmeasure for p in pool]
        pairs += len(pool)
        ok = max(scores, default=0.0) < threshold
        keep.append(ok)
        if ok:
            pool.append(c)
    return keep, time.perf_counter() - t0, time.process_time() - c0, pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num", type=int, default=10_000)
    ap.add_argument("--naive-limit", type=int, default=None, help="naive pass on the first N")
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--out", default="benchmarks/results/rouge_filter_cpu.json")
    args = ap.parse_args()
    seeds = [t.instruction for t in read_seed_tasks(SEED_TASKS)]
    cands = candidates(args.num)
    keep, fast_s, fast_cpu = fast_filter(seeds, cands, args.threshold)
    limit = min(args.naive_limit or len(cands), len(cands))
    naive_keep, naive_s, naive_cpu, pairs = naive_filter(seeds, cands[:limit], args.threshold)
    assert naive_keep == keep[:limit], "the two filters disagree"
    # pairs the naive pass would score on all candidates: pool size before each candidate
    pool, all_pairs = len(seeds), 0
    for k in keep:
        all_pairs += pool
        pool += k
    result = {
        "candidates": len(cands),
        "mean_tokens": sum(len(rouge_tokens(c)) for c in cands) / len(cands),
        "kept": sum(keep),
        "dropped_near_duplicates": len(cands) - sum(keep),
        "fast_s": round(fast_s, 2),
        "fast_cpu_s": round(fast_cpu, 2),
        "naive_candidates": limit,
        "naive_s": round(naive_s, 2),
        "naive_cpu_s": round(naive_cpu, 2),
        "naive_pairs": pairs,
        "naive_s_all_extrapolated": round(naive_s * all_pairs / max(pairs, 1), 1),
        "naive_cpu_s_all_extrapolated": round(naive_cpu * all_pairs / max(pairs, 1), 1),
        "naive_pairs_all": all_pairs,
        "same_decisions": True,
        "cpu": platform.processor() or platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
