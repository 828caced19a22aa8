"""Preference pairs, reward models and DPO on tiny models (CPU, fp32)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from llamaforge.cli import main
from llamaforge.data.pipeline import build_dataset
from llamaforge.data.preference import IDENTICAL, Preference, to_preference, tokenize_pair
from llamaforge.data.sources import EMPTY_RESPONSE, ZERO_TRAINABLE, BadRow, DataError
from llamaforge.data.tokenizer import load_tokenizer
from llamaforge.io.hf import add_score_head, load_hf, save_hf
from llamaforge.losses import dpo_loss_fn, reward_loss_fn, reward_scores, sequence_logps
from llamaforge.train.batches import collate_pairs, collate_shared_pairs
from tests.helpers import random_model, tiny_hf_folder

FIX = Path(__file__).parent / "fixtures" / "data"
PAIRS = FIX / "preference.jsonl"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(FIX / "tiny_tokenizer")


def _pairs(tok, **kw):
    spec = {"path": str(PAIRS), "format": "preference", "template": "chatml", "val_size": 2}
    return build_dataset({**spec, **kw}, tok, use_cache=False)


def test_pairs_share_prompt_ids_and_learn_only_answers(tok):
    splits = _pairs(tok)
    assert splits.report.examples == {"train": 10, "validation": 2, "test": 0}
    for ex in splits.train:
        assert all(x != -100 for x in ex["chosen_labels"][:-1])  # answer tokens carry loss
        assert ex["chosen_ids"] != ex["rejected_ids"]
    batch = collate_pairs(splits.train[:3], pad_id=0)
    assert batch["input_ids"].shape[0] == 6
    p = len(splits.train[0]["prompt_ids"])
    assert torch.equal(batch["input_ids"][0, :p], batch["input_ids"][3, :p])  # shared prompt
    assert (batch["labels"][0, :p] == -100).all()


def test_conversation_shape_splits_at_the_shared_prefix():
    row = json.loads(PAIRS.read_text().splitlines()[10])
    pref = to_preference(row)
    assert [m["role"] for m in pref.prompt] == ["user", "assistant", "user"]
    assert pref.chosen[0]["content"] == "An apple." and pref.rejected[0]["content"] == "A hammer."


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, IDENTICAL),
        ({"prompt": "q", "chosen": "  ", "rejected": "no"}, EMPTY_RESPONSE),
        ({"prompt": "q", "chosen": "yes"}, "missing field"),
    ],
)
def test_bad_pairs_are_named(row, reason):
    with pytest.raises(BadRow) as e:
        to_preference(row)
    assert e.value.reason == reason


def test_strict_bad_row_names_file_and_line(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(PAIRS.read_text() + json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}))
    with pytest.raises(DataError, match=r"bad.jsonl:13: chosen equals rejected"):
        _pairs(tok, path=str(bad))
    lenient = _pairs(tok, path=str(bad), lenient=True)
    assert lenient.report.skipped == {IDENTICAL: 1}


def test_truncation_cuts_prompt_from_the_left_then_answers(tok):
    pref = Preference(
        ({"role": "user", "content": "one two three four five six seven eight nine ten"},),
        ({"role": "assistant", "content": "alpha beta gamma delta epsilon zeta"},),
        ({"role": "assistant", "content": "no"},),
    )
    full, cut = tokenize_pair(pref, tok, template="chatml", max_seq_len=4096)
    assert not cut
    ex, cut = tokenize_pair(pref, tok, template="chatml", max_seq_len=20, max_prompt_len=8)
    assert cut and ex["prompt_ids"] == full["prompt_ids"][-8:]
    assert ex["chosen_ids"] == full["chosen_ids"][:12]
    with pytest.raises(BadRow) as e:
        tokenize_pair(pref, tok, template="chatml", max_seq_len=8, max_prompt_len=8)
    assert e.value.reason == ZERO_TRAINABLE
    assert tokenize_pair(pref, tok, template="chatml", max_seq_len=20, truncation="drop") is None


def _lora_model():
    from llamaforge.adapters.inject import apply_lora

    return apply_lora(random_model("tiny-llama3", seed=1), r=4, alpha=8, dropout=0.0)


@pytest.mark.parametrize("collate_fn", [collate_pairs, collate_shared_pairs])
def test_dpo_loss_is_ln2_at_step_0_with_adapters_off_reference(tok, collate_fn):
    from llamaforge.train.stages import _adapters_off_reference

    model = _lora_model()
    batch = collate_fn(_pairs(tok).train[:4], pad_id=0)
    for loss in ("sigmoid", "hinge", "ipo"):
        fn = dpo_loss_fn(loss, beta=0.1, reference=_adapters_off_reference)
        total, n, extras = fn(model, batch)
        want = {"sigmoid": math.log(2), "hinge": 1.0, "ipo": 25.0}[loss]  # (1 / 2β)² for ipo
        assert int(n) == 4 and abs(float(total) / 4 - want) < 1e-5, loss
        assert float(extras["margin"]) == 0.0


def test_reward_scores_do_not_depend_on_padding_side_or_batch_size(tok):
    model = add_score_head(random_model("tiny-llama3", seed=2))
    seqs = [[5, 9, 13, 2], [7, 8, 9, 10, 11, 12, 3], [4, 4]]
    width = max(map(len, seqs))
    right = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    left = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    am = (torch.arange(width)[None] >= torch.tensor([width - len(s) for s in seqs])[:, None]).long()
    with torch.no_grad():
        r = reward_scores(
            model, {"input_ids": right, "seq_lens": torch.tensor(list(map(len, seqs)))}
        )
        lft = reward_scores(model, {"input_ids": left, "attention_mask": am})
        solo = [
            reward_scores(
                model, {"input_ids": torch.tensor([s]), "seq_lens": torch.tensor([len(s)])}
            )
            for s in seqs
        ]
    assert torch.allclose(r, lft, atol=1e-5)
    assert torch.allclose(r, torch.cat(solo), atol=1e-5)


def test_reward_model_folder_loads_in_transformers_with_same_scores(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = add_score_head(random_model("tiny-llama3", seed=4)).eval()
    save_hf(model, tmp_path / "rm")
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "rm", dtype=torch.float32
    ).eval()
    ids = torch.randint(3, 200, (3, 17))
    with torch.no_grad():
        ours = reward_scores(model, {"input_ids": ids, "seq_lens": torch.full((3,), 17)})
        theirs = ref(ids).logits[:, 0]
        back = reward_scores(
            load_hf(tmp_path / "rm"), {"input_ids": ids, "seq_lens": torch.full((3,), 17)}
        )
    assert (ours - theirs).abs().max() < 1e-4
    assert torch.equal(ours, back)


def test_unknown_weights_are_an_error_not_dropped(tmp_path):
    from llamaforge.io.hf import build_from_state_dict, load_hf_state_dict, read_config
    from llamaforge.model.config import ConfigError

    model = add_score_head(random_model("tiny-llama3", seed=4))
    save_hf(model, tmp_path / "rm")
    sd = load_hf_state_dict(tmp_path / "rm")
    with pytest.raises(ConfigError, match="unexpected weights.*score.weight"):
        build_from_state_dict(read_config(tmp_path / "rm"), sd)


def test_reward_loss_counts_pairs_and_accuracy():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    from llamaforge.losses import reward_pair_loss

    got = reward_pair_loss(chosen, rejected, margin=0.5)
    want = -torch.nn.functional.logsigmoid(torch.tensor([0.5, -1.5]))
    assert torch.allclose(got, want)
    assert callable(reward_loss_fn())


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tiny_hf_folder(tmp_path_factory.mktemp("base"))


def _config(tmp_path: Path, base: Path, stage: str, method: str, **extra) -> Path:
    raw = {
        "model": str(base),
        "stage": stage,
        "method": method,
        "data": {
            "path": str(PAIRS),
            "format": "preference",
            "template": "chatml",
            "val_size": 0.17,
            "cache_dir": str(tmp_path / "cache"),
        },
        "output_dir": str(tmp_path / f"{stage}-{method}"),
        "max_steps": 4,
        "checkpoint": {"every": 2},
        "optim": {"lr": 0.01, "batch_size": 2},
        "logging": {"tensorboard": False, "progress": False},
        **extra,
    }
    path = tmp_path / f"{stage}-{method}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("stage", "method"), [("rm", "lora"), ("rm", "full"), ("dpo", "lora"), ("dpo", "full")]
)
def test_train_stage_end_to_end_and_resume_exactly(tmp_path, base_dir, stage, method, capsys):
    cfg = _config(tmp_path, base_dir, stage, method)
    assert main(["train", str(cfg)]) == 0
    summary = json.loads(capsys.readouterr().out)
    out = Path(summary["output"]).parent
    train = [m for m in _metrics(out) if m["kind"] == "train"]
    assert len(train) == 4 and "accuracy" in train[0] and "margin" in train[0]
    if stage == "dpo":
        assert abs(train[0]["loss"] - math.log(2)) < 1e-4  # reference = policy at step 0
        assert "logp_chosen" in train[0]
    assert "val_accuracy" in summary["validation"]
    if stage == "rm":
        assert (out / "model" / "config.json").is_file()
        rm = load_hf(out / "model")
        assert rm.score.weight.shape == (1, rm.cfg.dim)
    # resume: drop the last checkpoint; the rerun resumes at step 2 and must log the same
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["checkpoint-00000002", "checkpoint-00000004"]
    shutil.rmtree(ckpts[-1])
    assert main(["train", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "checkpoint-00000002" in str(ckpts[0])
    # full DPO's reference log-probs come back from the disk cache (same values: same losses)
    assert ("reference log-probs from cache" in err) == ((stage, method) == ("dpo", "full"))
    again = [m for m in _metrics(out) if m["kind"] == "train"]
    assert [round(m["loss"], 6) for m in again] == [round(m["loss"], 6) for m in train]


def test_damaged_reference_cache_is_recomputed(tmp_path, tok):
    from types import SimpleNamespace

    from llamaforge.config import DataConfig, RunConfig
    from llamaforge.train.stages import REF_KEYS, STAGES, reference_cache_file

    pairs = _pairs(tok)
    cfg = RunConfig(
        model="smollm2-135m-instruct",
        data=DataConfig(path=str(PAIRS), cache_dir=str(tmp_path / "data")),
        stage="dpo",
        method="full",
    )
    model = random_model("tiny-llama3", seed=2)

    def reference() -> list[float]:
        splits = SimpleNamespace(train=[dict(e) for e in pairs.train], validation=[])
        STAGES["dpo"].before_train(model, cfg, splits, 0)
        return [e[k] for e in splits.train for k in REF_KEYS]

    first = reference()
    (cached,) = (tmp_path / "reference").glob("*.npz")
    assert reference() == first  # read back
    cached.write_bytes(b"not an npz")
    assert reference() == first and cached.stat().st_size > 100  # recomputed and rewritten
    assert not list(cached.parent.glob(".*.tmp"))
    assert reference_cache_file(cfg, "k").parent == tmp_path / "reference"


def test_rm_stage_needs_pairs(tmp_path, base_dir, capsys):
    cfg = _config(tmp_path, base_dir, "rm", "lora")
    assert main(["train", str(cfg), "data.format=alpaca"]) == 2
    assert "stage rm trains on preference pairs" in capsys.readouterr().err


@pytest.mark.parametrize("lora", [True, False])  # frozen head: fused per token; trained: chunked
def test_sequence_logps_matches_full_logits_with_gradients(tok, lora):
    import torch.nn.functional as F

    model = _lora_model() if lora else random_model("tiny-llama3", seed=5)
    batch = collate_pairs(_pairs(tok).train[:2], pad_id=0)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.tensor([0.3, -1.2, 0.7, 2.0])  # a different upstream gradient per row
    logps, n = sequence_logps(model, batch)
    got = torch.autograd.grad((logps * weights).sum(), params)
    logits = model(batch["input_ids"])[:, :-1].float()
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    want_logps = -(nll * (labels != -100)).sum(1)
    want = torch.autograd.grad((want_logps * weights).sum(), params)
    assert torch.allclose(logps, want_logps, atol=1e-4)
    assert n.tolist() == (labels != -100).sum(1).tolist()
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)


def test_score_cli_prints_accuracy_margin_and_length_baseline(tmp_path, base_dir, capsys):
    cfg = _config(
        tmp_path, base_dir, "rm", "full", max_steps=6, optim={"lr": 0.02, "batch_size": 4}
    )
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    rm = tmp_path / "rm-full" / "model"
    out = tmp_path / "scores.jsonl"
    args = ["score", str(rm), "--data", str(PAIRS), "--template", "chatml", "--out", str(out)]
    assert main(args) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["pairs"] == 12 and set(line) == {
        "pairs",
        "accuracy",
        "mean_margin",
        "length_baseline",
    }
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 12
    acc = sum(r["margin"] > 0 for r in rows) / 12
    assert abs(acc - line["accuracy"]) < 1e-9
    assert line["accuracy"] > 0.5  # trained on these pairs, it prefers more than chance
    assert main(["score", str(base_dir), "--data", str(PAIRS)]) == 2
    assert "not a reward model" in capsys.readouterr().err


def test_chitchat_pair_tasks_hold_out_whole_starter_questions():
    from llamaforge.data import chitchat

    for task in chitchat.PAIR_TASKS:  # the real 7,168 conversations (~1 s each)
        rows, filtered = chitchat.read_pairs(task)
        assert len(rows) > 1000, (task, filtered)
        split_of: dict[str, set[str]] = {}
        for r in rows:
            split_of.setdefault(_topic(r.data), set()).add(r.split)
            pref = to_preference(r.data)
            assert pref.chosen != pref.rejected
        assert all(len(s) == 1 for s in split_of.values())  # a topic lives in one split
        assert {r.split for r in rows} == {"train", "validation", "test"}
    assert filtered["default all-5 ratings"] > 0


def _topic(row: dict) -> str:
    if isinstance(row["prompt"], list):
        return row["prompt"][0]["content"].removeprefix("Conversation starter: ")
    return row["prompt"].rsplit("starter: ", 1)[1]


def test_lora_reward_adapter_loads_in_peft_and_back_with_same_scores(tmp_path, base_dir):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from llamaforge.adapters.inject import apply_lora
    from llamaforge.io.peft import load_peft_adapter, save_peft_adapter

    model = add_score_head(load_hf(base_dir))
    apply_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    save_peft_adapter(model, tmp_path / "adapter", heads=("score",))
    ids = torch.randint(3, 200, (2, 15))
    batch = {"input_ids": ids, "seq_lens": torch.full((2,), 15)}
    with torch.no_grad():
        ours = reward_scores(model.eval(), batch)
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            base_dir, num_labels=1, pad_token_id=0, dtype=torch.float32
        )
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(ids).logits[:, 0]
        back = load_hf(base_dir)
        load_peft_adapter(back, tmp_path / "adapter")
        again = reward_scores(back.eval(), batch)
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - again).abs().max() < 1e-6


@pytest.mark.parametrize("lora", [True, False])
def test_shared_prompt_rows_give_each_answer_the_logps_of_its_own_row(tok, lora):
    """One row per pair (prompt once, rejected masked from chosen) against two rows per pair:
    the same log-probs, counts and gradients; with a masked label inside an answer, answers
    of different lengths and a pair without a prompt."""
    from llamaforge.losses import count_pairs

    model = _lora_model() if lora else random_model("tiny-llama3", seed=5)
    pairs = [dict(ex) for ex in _pairs(tok).train[:3]]
    pairs[1]["chosen_labels"] = [-100] + pairs[1]["chosen_labels"][1:]
    pairs[2] = {**pairs[2], "prompt_ids": [], "rejected_ids": pairs[2]["rejected_ids"][:3],
                "rejected_labels": pairs[2]["rejected_labels"][:3]}  # fmt: skip
    two, one = collate_pairs(pairs, pad_id=0), collate_shared_pairs(pairs, pad_id=0)
    assert one["input_ids"].shape[0] == 3 and count_pairs(one) == count_pairs(two) == 3
    p = len(pairs[0]["prompt_ids"])
    assert one["input_ids"].shape[1] < two["input_ids"].shape[1] + p  # the prompt once
    params = [q for q in model.parameters() if q.requires_grad]
    weights = torch.tensor([0.3, -1.2, 0.7, 2.0, 1.1, -0.4])
    got_logps, got_n = sequence_logps(model, one)
    want_logps, want_n = sequence_logps(model, two)
    assert got_n.tolist() == want_n.tolist()
    torch.testing.assert_close(got_logps, want_logps, atol=1e-4, rtol=1e-5)
    got = torch.autograd.grad((got_logps * weights).sum(), params)
    want = torch.autograd.grad((want_logps * weights).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_dpo_and_rm_run_shared_prompt_rows_unless_told_not_to():
    from llamaforge.config import DataConfig, RunConfig
    from llamaforge.train.stages import STAGES

    cfg = RunConfig(model="m", data=DataConfig(path="-"), stage="dpo")
    assert STAGES["dpo"].batches(cfg) is collate_shared_pairs
    assert STAGES["rm"].batches(cfg) is collate_shared_pairs
    cfg.dpo.shared_prompt = cfg.rm.shared_prompt = False
    assert STAGES["dpo"].batches(cfg) is collate_pairs
    assert STAGES["rm"].batches(cfg) is collate_pairs
    assert STAGES["sft"].batches(cfg) is STAGES["sft"].collate


def test_shared_prompt_rows_give_the_reward_scores_and_loss_of_two_rows(tok):
    """Each answer scored at its own last token in the shared row: the scores, the pairwise
    loss and its gradients of two rows a pair."""
    model = add_score_head(random_model("tiny-llama3", seed=2))
    pairs = [dict(ex) for ex in _pairs(tok).train[:3]]
    pairs[1] = {**pairs[1], "rejected_ids": pairs[1]["rejected_ids"][:2],
                "rejected_labels": pairs[1]["rejected_labels"][:2]}  # fmt: skip
    one, two = collate_shared_pairs(pairs, pad_id=0), collate_pairs(pairs, pad_id=0)
    torch.testing.assert_close(
        reward_scores(model, one), reward_scores(model, two), atol=1e-5, rtol=1e-5
    )
    fn = reward_loss_fn(margin=0.5, center_coef=0.01)
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lm_head" not in n]
    (got, n_got, _), (want, n_want, _) = fn(model, one), fn(model, two)
    assert int(n_got) == int(n_want) == 3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(
        torch.autograd.grad(got, params), torch.autograd.grad(want, params), strict=True
    ):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def _segment_attention(q, k, v, cu, max_len, cu_k=None, max_k=None):
    """Causal attention per segment of flat tokens (what flash varlen computes), on the CPU;
    a query segment shorter than its key segment is its last queries (flash's mask lines the
    last query up with the last key)."""
    import torch.nn.functional as F

    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    qb, kb = cu.tolist(), (cu if cu_k is None else cu_k).tolist()
    for a, b, c, d in zip(qb, qb[1:], kb, kb[1:], strict=False):
        if b > a:
            qs, ks, vs = q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1)
            ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
            mask = torch.ones(b - a, d - c, dtype=torch.bool).tril(d - c - (b - a))
            out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(0, 1)
    assert max_len == max(b - a for a, b in zip(qb, qb[1:], strict=False))
    assert max_k is None or max_k == max(d - c for c, d in zip(kb, kb[1:], strict=False))
    return out


@pytest.mark.parametrize("queries_once", [False, True])
def test_shared_prompt_varlen_segments_equal_the_dense_mask(tok, monkeypatch, queries_once):
    """Where flash varlen runs, each pair row is two segments (prompt + chosen, prompt +
    rejected): the same log-probs and gradients as the dense shared-prompt mask, with the
    queries laid out like the keys or (where flash's mask allows) without the prompt copy."""
    from llamaforge.model import llama as llama_mod

    monkeypatch.setattr(llama_mod, "varlen_causal_aligns_end", lambda: queries_once)
    model = _lora_model()
    pairs = [dict(ex) for ex in _pairs(tok).train[:3]]
    pairs[2] = {**pairs[2], "rejected_ids": pairs[2]["rejected_ids"][:2],
                "rejected_labels": pairs[2]["rejected_labels"][:2]}  # fmt: skip
    batch = collate_shared_pairs(pairs, pad_id=0)
    seg = llama_mod.PairSegments.from_parts(batch["pair_parts"])
    lens = [
        len(ex["prompt_ids"]) * 2 + len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in pairs
    ]
    assert seg.cu_seqlens.numel() == 7 and int(seg.cu_seqlens[-1]) == sum(lens)
    params = [q for q in model.parameters() if q.requires_grad]
    weights = torch.tensor([0.3, -1.2, 0.7, 2.0, 1.1, -0.4])
    want_logps, _ = sequence_logps(model, batch)
    want = torch.autograd.grad((want_logps * weights).sum(), params)
    monkeypatch.setattr(llama_mod, "varlen_attention_flat", _segment_attention)
    model.varlen_usable = lambda ids: True
    got_logps, _ = sequence_logps(model, batch)
    got = torch.autograd.grad((got_logps * weights).sum(), params)
    torch.testing.assert_close(got_logps, want_logps, atol=1e-4, rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen attention needs a GPU")
def test_shared_prompt_rows_on_the_gpu_match_two_rows(tok):
    """Flash varlen segments against two rows a pair, bf16 on the GPU."""
    model = random_model("tiny-llama3", seed=3).to("cuda", torch.bfloat16)
    pairs = _pairs(tok).train[:4]
    one = {k: v.cuda() for k, v in collate_shared_pairs(pairs, pad_id=0).items()}
    two = {k: v.cuda() for k, v in collate_pairs(pairs, pad_id=0).items()}
    assert model.varlen_usable(one["pair_parts"])
    with torch.no_grad():
        got, n_got = sequence_logps(model, one)
        want, n_want = sequence_logps(model, two)
    assert n_got.tolist() == n_want.tolist()
    torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0.02)
    # and the gradients through the segments' lay-out (its hand-written backward), LoRA
    # weights in fp32 over the bf16 base, against two rows a pair
    from llamaforge.adapters.inject import apply_lora

    apply_lora(model, r=4, alpha=8, dropout=0.0, lora_dtype=torch.float32)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.linspace(-1, 1, 2 * len(pairs), device="cuda")
    grads = []
    for b in (one, two):
        with torch.autocast("cuda", torch.bfloat16):  # as the loop runs a bf16 base
            logps = sequence_logps(model, b)[0]
        grads.append(torch.autograd.grad((logps * weights).sum(), params))
    for g, w in zip(*grads, strict=True):
        torch.testing.assert_close(g, w, atol=0.05 * w.abs().max().item(), rtol=0.05)


def test_the_end_alignment_check_tells_the_two_causal_masks_apart():
    """The check behind `varlen_causal_aligns_end`, with stand-ins for flash: one that lines
    a shorter query segment up with the end of its keys passes, one that starts them
    together (top-left, as SDPA's is_causal) fails."""
    import torch.nn.functional as F

    from llamaforge.kernels.attention import _check_end_alignment

    def top_left(q, k, v, cu_q, max_q, cu_k, max_k):
        mask = torch.ones(max_q, max_k, dtype=torch.bool).tril(0)
        out = F.scaled_dot_product_attention(
            *(x.transpose(0, 1) for x in (q, k, v)), attn_mask=mask
        )
        return out.transpose(0, 1)

    assert _check_end_alignment("cpu", _segment_attention)
    assert not _check_end_alignment("cpu", top_left)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen attention needs a GPU")
def test_flash_varlen_lines_a_shorter_query_segment_up_with_the_keys_end():
    """What lets shared-prompt rows drop the prompt copy's queries (PairSegments.attend):
    if this fails they keep them, slower but right."""
    from llamaforge.kernels.attention import varlen_available, varlen_causal_aligns_end

    if not varlen_available():
        pytest.skip("this torch has no flash varlen attention")
    assert varlen_causal_aligns_end()


def test_reference_log_probs_precomputed_on_shared_rows_equal_two_rows(tok):
    from llamaforge.train.stages import REF_KEYS, precompute_reference

    model = random_model("tiny-llama3", seed=4)
    one = [dict(ex) for ex in _pairs(tok).train[:5]]
    two = [dict(ex) for ex in one]
    precompute_reference(model, one, 0, 2, collate_shared_pairs)
    precompute_reference(model, two, 0, 2)
    for a, b in zip(one, two, strict=True):
        for key in REF_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-4)


def test_pair_segment_layout_backward_equals_autograd_over_slices():
    """`PairSegments.attend`'s lay-out and gather (hand-written backward, one concatenation
    each) give autograd's gradients over plain slices and concatenations, bit for bit, with
    padding and rows of other lengths; and the backward writes about one tensor of the
    input's size, where autograd over slices writes one per piece."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from llamaforge.model.llama import (
        CHOSEN_PART,
        PAD_PART,
        PROMPT_PART,
        REJECTED_PART,
        PairSegments,
        _PairGather,
        _PairLayout,
        _Repad,
        _Unpad,
    )

    torch.manual_seed(0)
    bounds = ((3, 5, 8), (2, 6, 7), (4, 4, 9))  # (P, P + C, P + C + R); width 9
    parts = torch.full((3, 9), PAD_PART)
    for r, (p, pc, end) in enumerate(bounds):
        parts[r, :p], parts[r, p:pc], parts[r, pc:end] = PROMPT_PART, CHOSEN_PART, REJECTED_PART
    seg = PairSegments.from_parts(parts)
    assert seg.bounds == bounds
    q, k, v = (torch.randn(3, h, 9, 4, requires_grad=True) for h in (4, 2, 2))
    grad_out = torch.randn(27, 4, 4)

    def reference(q, k, v):  # the layout as autograd over slices would differentiate it
        def lay_out(x):
            rows, pieces = x.transpose(1, 2), []
            for r, (p, pc, end) in enumerate(bounds):
                pieces += [rows[r, :pc], rows[r, :p], rows[r, pc:end]]
            return torch.cat(pieces)

        out = _segment_attention(lay_out(q), lay_out(k), lay_out(v), seg.cu_seqlens, seg.max_len)
        pieces, at = [], 0
        for p, pc, end in bounds:
            pieces += [out[at : at + pc], out[at + pc + p : at + p + end]]
            pieces.append(out.new_zeros(9 - end, *out.shape[1:]))
            at += p + end
        return torch.cat(pieces)

    want = reference(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    got = seg.attend(q, k, v, attention=_segment_attention)
    torch.testing.assert_close(got, want, atol=0, rtol=0)

    got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)

    class Written(TorchDispatchMode):  # elements of the new (non-view) tensors ops write
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            aliases = func._schema.returns and func._schema.returns[0].alias_info is not None
            if isinstance(out, torch.Tensor) and not aliases:  # views write nothing
                self.n += out.numel()
            return out

    def written_by_backward(y, leaf):
        g = torch.randn_like(y)
        with Written() as w:
            torch.autograd.grad(y, leaf, g)
        return w.n

    rows = q.transpose(1, 2)
    pieces = [rows[r, s] for r, (p, pc, end) in enumerate(bounds)
              for s in (slice(0, pc), slice(0, p), slice(pc, end))]  # fmt: skip
    assert written_by_backward(torch.cat(pieces), q) > 5 * q.numel()  # autograd over slices
    assert written_by_backward(_PairLayout.apply(rows, bounds), q) < 1.5 * q.numel()
    out = torch.randn(11, 4, 4, requires_grad=True)  # one row's laid-out outputs, P 3, C 2, R 3
    pieces = [out[:5], out[8:11], out.new_zeros(1, 4, 4)]
    assert written_by_backward(torch.cat(pieces), out) > 2 * out.numel()
    assert written_by_backward(_PairGather.apply(out, ((3, 5, 8),), 9), out) < 1.5 * out.numel()
    ends = tuple(end for _, _, end in bounds)
    assert written_by_backward(_Unpad.apply(rows, ends), q) < 1.5 * q.numel()
    flat = torch.randn(sum(ends), 4, 4, requires_grad=True)
    assert written_by_backward(_Repad.apply(flat, ends, 9), flat) < 1.5 * flat.numel()

    # the queries laid out once (no prompt copy): the same outputs and gradients
    once = seg.attend(q, k, v, attention=_segment_attention, queries_once=True)
    torch.testing.assert_close(once, want, atol=1e-6, rtol=1e-5)
    for g, w in zip(torch.autograd.grad(once, (q, k, v), grad_out), want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    full = PairSegments.from_parts(torch.tensor([[0, 0, 1, 2, 2], [0, 1, 1, 1, 2]]))
    assert full.bounds == ((2, 3, 5), (1, 4, 5))  # no padding: the rows are the queries
    qf, kf, vf = (torch.randn(2, h, 5, 4, requires_grad=True) for h in (4, 2, 2))
    args = (qf, kf, vf, _segment_attention)
    torch.testing.assert_close(
        full.attend(*args, queries_once=True), full.attend(*args, queries_once=False),
        atol=1e-6, rtol=1e-5,
    )  # fmt: skip
