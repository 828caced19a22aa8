"""Reward-model and DPO quality on real chitchat pairs: llamaforge vs TRL at the same settings.

One run, one GPU (or CPU with --steps small). For each pair task (chitchat_next_turn,
chitchat_ratings), from JSONL files of its train/test splits (held-out starter questions):
- llamaforge `stage: rm` (LoRA r16 on every projection + a score head), then held-out
  pairwise accuracy, mean margin and the length-only baseline (`llamaforge score`);
- TRL `RewardTrainer` + peft on transformers' LlamaForSequenceClassification with the same
  settings, fed exactly llamaforge's token ids (pre-tokenized `chosen_ids`/`rejected_ids`),
  scored on the same held-out pairs;
- for chitchat_next_turn: DPO (LoRA, reference = adapters off) from SmolLM2-Instruct, its
  held-out implicit-reward accuracy, and the trained reward model's mean score of greedy
  answers to held-out prompts before and after DPO.
Writes one JSON file (--out) and prints one line per task. The JSONL files come from the
built-in data: `python benchmarks/preference_quality.py --write-data DIR` (no training).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("chitchat_next_turn", "chitchat_ratings")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lf(*args: str) -> str:
    """Run the llamaforge CLI; return its stdout (stderr passes through)."""
    cmd = [sys.executable, "-m", "llamaforge.cli", *args]
    return subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout


def settings(a) -> list[str]:
    """The run settings both stacks share (as llamaforge overrides)."""
    return [
        f"max_steps={a.steps}",
        f"optim.lr={a.lr}",
        f"optim.batch_size={a.batch_size}",
        "optim.warmup_steps=5",
        "optim.schedule=cosine",
        "optim.weight_decay=0.0",
        "optim.max_grad_norm=1.0",
        "lora.r=16",
        "lora.alpha=32",
        "lora.dropout=0.0",
        "data.max_seq_len=256",
        "data.max_prompt_len=192",
        "data.format=preference",
        "data.val_size=0.0",
        "logging.progress=false",
        "logging.tensorboard=false",
        "checkpoint.every=null",
    ]


def ours_rm(a, task: str, work: Path) -> dict:
    out = work / f"rm-{task}"
    t0 = time.time()
    lf(
        "train",
        str(ROOT / "configs/rm_chitchat.yaml"),
        f"model={a.model}",
        f"data.path={a.data}/{task}.train.jsonl",
        f"output_dir={out}",
        *settings(a),
    )
    seconds = time.time() - t0
    res = json.loads(
        lf(
            "score",
            str(out / "model"),
            "--data",
            f"{a.data}/{task}.test.jsonl",
            "--max-seq-len",
            "256",
        )
    )
    return {**res, "train_seconds": round(seconds, 1), "model": str(out / "model")}


def tokenized(a, task: str, split: str):
    from llamaforge.data.pipeline import build_dataset
    from llamaforge.io.load import load_model

    _, tok = load_model(a.model, device="cpu")
    spec = {
        "path": f"{a.data}/{task}.{split}.jsonl",
        "format": "preference",
        "max_seq_len": 256,
        "max_prompt_len": 192,
        "val_size": 0.0,
    }
    return build_dataset(spec, tok, use_cache=False).train, tok


def trl_rm(a, task: str, work: Path, hf_dir: Path) -> dict:
    import datasets
    import peft
    import transformers
    import trl

    train, tok = tokenized(a, task, "train")
    test, _ = tokenized(a, task, "test")
    rows = [
        {
            "chosen_ids": e["prompt_ids"] + e["chosen_ids"],
            "rejected_ids": e["prompt_ids"] + e["rejected_ids"],
        }
        for e in train
    ]
    ds = datasets.Dataset.from_list(rows)
    pad = tok.pad_id if tok.pad_id is not None else 0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        hf_dir, num_labels=1, pad_token_id=pad, dtype=torch.float32
    )
    htok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    htok.pad_token_id = pad
    cfg = trl.RewardConfig(
        output_dir=str(work / f"trl-{task}"),
        max_steps=a.steps,
        learning_rate=a.lr,
        per_device_train_batch_size=a.batch_size,
        warmup_steps=5,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=torch.cuda.is_available(),
        max_length=None,
        report_to=[],
        save_strategy="no",
        logging_steps=10,
        seed=0,
        dataloader_drop_last=False,
        gradient_checkpointing=False,
        disable_dropout=True,
    )
    lcfg = peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="SEQ_CLS"
    )
    trainer = trl.RewardTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=htok, peft_config=lcfg
    )
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    net = trainer.model.eval()
    dev = next(net.parameters()).device
    wins, margins, longer = 0.0, 0.0, 0.0
    with torch.no_grad():
        for e in test:
            r = []
            for side in ("chosen", "rejected"):
                ids = torch.tensor([e["prompt_ids"] + e[f"{side}_ids"]], device=dev)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    r.append(float(net(input_ids=ids).logits[0, 0]))
            m = r[0] - r[1]
            wins += 1.0 if m > 0 else 0.5 if m == 0 else 0.0
            margins += m
            c, rr = len(e["chosen_ids"]), len(e["rejected_ids"])
            longer += 1.0 if c > rr else 0.5 if c == rr else 0.0
    n = len(test)
    return {
        "pairs": n,
        "accuracy": wins / n,
        "mean_margin": margins / n,
        "length_baseline": longer / n,
        "train_seconds": round(seconds, 1),
    }


def dpo(a, work: Path, rm_dir: str) -> dict:
    task = "chitchat_next_turn"
    out = work / "dpo"
    test_file = f"{a.data}/{task}.test.jsonl"
    summary = json.loads(
        lf(
            "train",
            str(ROOT / "configs/dpo_chitchat.yaml"),
            f"model={a.model}",
            f"data.path={a.data}/{task}.train.jsonl",
            f"data.val_path={test_file}",
            f"output_dir={out}",
            "eval.max_batches=null",
            *settings(a)[:-1],
            "optim.lr=5e-4",
        )
    )
    before = greedy_scores(a, test_file, rm_dir, None, a.greedy_n)
    after = greedy_scores(a, test_file, rm_dir, str(out / "adapter"), a.greedy_n)
    return {
        "heldout_reward_accuracy": summary["validation"].get("val_accuracy"),
        "heldout_margin": summary["validation"].get("val_margin"),
        "rm_mean_score_greedy_before": before,
        "rm_mean_score_greedy_after": after,
    }


def greedy_scores(a, test_file: str, rm_dir: str, adapter: str | None, n: int = 64) -> float:
    """The reward model's mean score of greedy answers to the first n held-out prompts."""
    from llamaforge.data.preference import to_preference
    from llamaforge.data.templates import render_conversation
    from llamaforge.io.load import load_model
    from llamaforge.io.peft import load_peft_adapter
    from llamaforge.losses import reward_scores
    from llamaforge.model.generate import SamplingParams, generate

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    policy, tok = load_model(a.model, device=dev)
    if adapter:
        load_peft_adapter(policy, adapter)
    rm, rtok = load_model(rm_dir, device=dev)
    rows = [json.loads(x) for x in Path(test_file).read_text().splitlines()[:n]]
    prompts = [list(to_preference(r).prompt) for r in rows]
    ids = [render_conversation(tok, p, add_generation_prompt=True)[0][-192:] for p in prompts]
    outs = generate(policy, ids, SamplingParams(max_new_tokens=48, stop_ids=sorted(tok.stop_ids)))
    scores = []
    with torch.no_grad():
        for p, o in zip(prompts, outs, strict=True):
            answer = tok.decode(o).strip() or "."
            seq = render_conversation(rtok, p + [{"role": "assistant", "content": answer}])[0]
            seq = seq[-256:]
            batch = {
                "input_ids": torch.tensor([seq], device=dev),
                "seq_lens": torch.tensor([len(seq)], device=dev),
            }
            scores.append(float(reward_scores(rm, batch)[0]))
    return sum(scores) / len(scores)


def write_data(folder: str) -> None:
    """<task>.train.jsonl / <task>.test.jsonl of the built-in chitchat pair tasks."""
    from llamaforge.data.chitchat import read_pairs

    Path(folder).mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        rows, _ = read_pairs(task)
        for split in ("train", "test"):
            lines = [json.dumps(r.data) for r in rows if r.split == split]
            Path(folder, f"{task}.{split}.jsonl").write_text("".join(x + "\n" for x in lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="SmolLM2 GGUF or HF folder")
    p.add_argument("--data", help="folder with <task>.train/test.jsonl")
    p.add_argument("--write-data", metavar="DIR", help="only write the task files to DIR")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--work", default="/tmp/prefq")
    p.add_argument("--out", default="preference_quality.json")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--greedy-n", type=int, default=64, help="held-out prompts answered")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--no-dpo", action="store_true")
    a = p.parse_args()
    if a.write_data:
        write_data(a.write_data)
        return
    if not (a.model and a.data):
        p.error("--model and --data are required (or --write-data DIR)")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = work / "smol-hf"
    if not a.no_trl and not hf_dir.is_dir():
        lf("convert", a.model, str(hf_dir), "--dtype", "float32")
    result: dict = {
        "settings": vars(a),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "tasks": {},
    }
    for task in a.tasks.split(","):
        r = {"llamaforge": ours_rm(a, task, work)}
        if not a.no_trl:
            r["trl"] = trl_rm(a, task, work, hf_dir)
        result["tasks"][task] = r
        print(task, json.dumps(r), flush=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    if not a.no_dpo and "chitchat_next_turn" in result["tasks"]:
        rm_dir = result["tasks"]["chitchat_next_turn"]["llamaforge"]["model"]
        result["dpo"] = dpo(a, work, rm_dir)
        print("dpo", json.dumps(result["dpo"]), flush=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
