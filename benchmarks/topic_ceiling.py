"""Classical-classifier ceiling for the chitchat dialogue -> topic quality benchmark.

benchmarks/quality.py fine-tunes SmolLM2-135M-Instruct to name a conversation's topic (its
`prompt`, one of 34 conversation starters) from the dialogue, scored by exact match on the
sha256-5% test split of ../shared/bench/hf_quality.py. This script is upper-bound evidence
for that task: a linear SVM on word 1-2-gram + character 2-5-gram TF-IDF, with C in
{0.1, 0.3, 1.0} tuned on a fixed 10% validation part of the training split (md5 of the id)
and then refit on the whole training split, shows how much of the topic the dialogues
carry. Split and rendering come from llamaforge.data.chitchat (the code quality.py trains
on): same sha256 split, and the same A:/B: text as hf_quality.py for all 6,925 conversations
(its merging of consecutive same-sender turns never applies to this data; checked).

Inputs (--inputs, comma-separated): cut350 (the benchmark's input: the A:/B: dialogue cut
to its first 350 space-separated words), first3 / first6 (first 3 / 6 turns), cut1000, full.
Reported per input: test exact match, top-2 and top-3 (ranks of decision_function), and
exact match on test conversations of under 50 words vs 50 words or more (whole
conversation); plus the majority-class baseline. Prints a markdown table; --out writes JSON.

scikit-learn is not a llamaforge dependency; run with any Python that has it:

    /tmp/clsvenv/bin/python benchmarks/topic_ceiling.py --inputs cut350,first6,full --out res.json

The dataset is found through the chitchat-dataset package's metadata. Where that package is
not installed in the running Python (e.g. a scratch scikit-learn venv), pass the file with
--data; the project's venv prints its path with
`.venv/bin/python -c "import llamaforge.data.chitchat as c; print(c.chitchat_path())"`.
CPU only; about 20 s (first3) to 3 min (full) per input on one core.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import sys
import time
from collections import Counter
from pathlib import Path

try:
    import numpy as np
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC
except ImportError as e:
    sys.exit(f"topic_ceiling.py needs scikit-learn (not a llamaforge dependency): {e}")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from llamaforge.data.chitchat import (  # noqa: E402
    DIST,
    FILE,
    MAX_WORDS,
    benchmark_split,
    dialogue_text,
    merged_turns,
)

ALL = sys.maxsize  # no word cut
INPUTS = {
    "cut350": lambda turns: dialogue_text(turns, MAX_WORDS),
    "first3": lambda turns: dialogue_text(turns[:3], ALL),
    "first6": lambda turns: dialogue_text(turns[:6], ALL),
    "cut1000": lambda turns: dialogue_text(turns, 1000),
    "full": lambda turns: dialogue_text(turns, ALL),
}
CS = (0.1, 0.3, 1.0)
SHORT = 50  # words in the whole conversation


def dataset_path(arg: str | None) -> Path:
    """--data, else dataset.json located through the chitchat-dataset package's metadata."""
    if arg:
        return Path(arg)
    try:
        return Path(str(importlib.metadata.distribution(DIST).locate_file(FILE)))
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"{DIST} is not installed in this Python; pass --data PATH/{FILE}")


def load(path: Path) -> list[dict]:
    """One row per conversation with a topic: its inputs, word count, topic and split."""
    raw = json.loads(path.read_bytes())
    rows = []
    for key in sorted(raw):
        topic = (raw[key].get("prompt") or "").strip()
        if not topic:
            continue
        turns = merged_turns(raw[key], drop_empty=False)
        split = benchmark_split(key) or "train"
        if split == "train" and int(hashlib.md5(key.encode()).hexdigest(), 16) % 10 == 0:
            split = "val"  # validation part of train, for choosing C only
        text = {name: f(turns) for name, f in INPUTS.items()}
        rows.append({**text, "topic": topic, "split": split, "words": len(text["full"].split(" "))})
    return rows


def features(field: str, fit: list[dict], others: list[list[dict]]):
    """Word 1-2-gram + char_wb 2-5-gram TF-IDF fitted on `fit`, applied to each of `others`."""
    word = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, max_df=0.9)
    char = TfidfVectorizer(
        analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=3, max_features=300000
    )
    texts = [r[field] for r in fit]
    x_fit = hstack([word.fit_transform(texts), char.fit_transform(texts)]).tocsr()
    x_others = []
    for rows in others:
        texts = [r[field] for r in rows]
        x_others.append(hstack([word.transform(texts), char.transform(texts)]).tocsr())
    return x_fit, x_others


def evaluate(field: str, train: list[dict], val: list[dict], test: list[dict], label) -> dict:
    """Tune C on val, refit on train+val, score the test split."""
    t0 = time.time()
    x_tr, (x_va,) = features(field, train, [val])
    val_acc = {
        c: float((LinearSVC(C=c).fit(x_tr, label(train)).predict(x_va) == label(val)).mean())
        for c in CS
    }
    best = max(val_acc, key=val_acc.get)
    x_all, (x_te,) = features(field, train + val, [test])
    scores = LinearSVC(C=best).fit(x_all, label(train + val)).decision_function(x_te)
    gold = label(test)
    rank = (scores > scores[np.arange(len(gold)), gold][:, None]).sum(1)  # 0 = gold ranked first
    short = np.array([r["words"] < SHORT for r in test])
    return {
        "input": field,
        "C": best,
        "val_acc_by_C": {str(c): round(a, 4) for c, a in val_acc.items()},
        "val_acc": round(val_acc[best], 4),
        "test_em": round(float((rank == 0).mean()), 4),
        "top2": round(float((rank < 2).mean()), 4),
        "top3": round(float((rank < 3).mean()), 4),
        f"em_under{SHORT}": round(float((rank[short] == 0).mean()), 4),
        f"n_under{SHORT}": int(short.sum()),
        f"em_{SHORT}plus": round(float((rank[~short] == 0).mean()), 4),
        f"n_{SHORT}plus": int((~short).sum()),
        "seconds": round(time.time() - t0, 1),
    }


def main() -> int:
    """Evaluate the chosen inputs, print a markdown table (JSON to --out)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", default=",".join(INPUTS), help=f"comma-separated: {list(INPUTS)}")
    p.add_argument("--data", default=None, help=f"path to {FILE} if {DIST} is not installed")
    p.add_argument("--out", default=None, help="write results JSON here")
    args = p.parse_args()
    fields = args.inputs.split(",")
    if unknown := [f for f in fields if f not in INPUTS]:
        p.error(f"unknown inputs {unknown}; choose from {list(INPUTS)}")

    path = dataset_path(args.data)
    rows = load(path)
    train, val, test = ([r for r in rows if r["split"] == s] for s in ("train", "val", "test"))
    topics = sorted({r["topic"] for r in rows})
    index = {t: i for i, t in enumerate(topics)}

    def label(rs: list[dict]) -> np.ndarray:
        return np.array([index[r["topic"]] for r in rs])

    majority = Counter(r["topic"] for r in train + val).most_common(1)[0][0]
    baseline = round(float(np.mean([r["topic"] == majority for r in test])), 4)
    print(
        f"{len(rows)} conversations: train {len(train)} (+ val {len(val)}), test {len(test)}; "
        f"{len(topics)} topics; majority-class baseline test EM {baseline:.1%}",
        flush=True,
    )
    results = []
    for field in fields:
        results.append(evaluate(field, train, val, test, label))
        print(f"{field}: {results[-1]}", flush=True)
        if args.out:  # written after each input, in case of a time limit
            summary = {
                "data": str(path),
                "counts": {"train": len(train), "val": len(val), "test": len(test)},
                "topics": len(topics),
                "majority_baseline_em": baseline,
                "results": results,
            }
            Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")

    print(f"\nchitchat dialogue->topic, LinearSVC on TF-IDF; majority class {baseline:.1%}")
    print(f"| input | C | val acc | test EM | top-2 | top-3 | EM <{SHORT} words | EM {SHORT}+ |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['input']} | {r['C']} | {r['val_acc']:.1%} | {r['test_em']:.1%} | "
            f"{r['top2']:.1%} | {r['top3']:.1%} | {r[f'em_under{SHORT}']:.1%} "
            f"(n={r[f'n_under{SHORT}']}) | {r[f'em_{SHORT}plus']:.1%} (n={r[f'n_{SHORT}plus']}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
