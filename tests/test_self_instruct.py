"""Self-instruct: the fast ROUGE-L filter, parsing and filters, resumable output, generators."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llamaforge.cli import build_parser, main
from llamaforge.data.pipeline import build_dataset
from llamaforge.io.hf import save_hf
from llamaforge.synth.generators import Completion, EndpointGenerator, GenParams, LocalGenerator
from llamaforge.synth.rouge import RougeIndex, lcs_length, rouge_l
from llamaforge.synth.self_instruct import (
    SEED_TASKS,
    SelfInstructConfig,
    Task,
    TaskPool,
    build_prompt,
    parse_completion,
    progress_path,
    read_seed_tasks,
    self_instruct,
)
from tests.helpers import random_model
from tests.serve_helpers import FIX, KEY, LiveServer, serve_args

WORDS = (
    "the a cat dog write poem about list three name give explain why how what is of to in "
    "ÉCOLE naïve 42 x-ray don't Hello, WORLD!! café_au_lait 3.14"
).split()


def _texts(n: int, seed: int, most: int = 90) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, most))) for _ in range(n)]


# ---------------------------------------------------------------- ROUGE-L


def test_rouge_l_equals_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = _texts(60, 0, most=40) + _texts(4, 9, most=150)  # some past one 64-bit word
    texts += ["", "!!!", "Hello, World!", "hello world", "ab ab ab"]
    for a in texts[:25] + texts[-9:]:
        for b in texts:
            assert rouge_l(a, b) == scorer.score(a, b)["rougeL"].fmeasure, (a, b)


def test_lcs_bit_parallel_matches_dynamic_programming():
    rng = random.Random(1)
    for _ in range(200):
        a = [rng.randrange(5) for _ in range(rng.randint(0, 140))]
        b = [rng.randrange(5) for _ in range(rng.randint(0, 140))]
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(len(a)):
            for j in range(len(b)):
                table[i + 1][j + 1] = (
                    table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
                )
        assert lcs_length(a, b) == table[-1][-1]


def test_index_max_equals_rouge_score_max_over_the_pool():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = _texts(100, 2, most=40) + _texts(8, 4, most=150)
    queries = _texts(15, 3, most=40) + _texts(4, 5, most=150)
    index = RougeIndex(pool)
    for q in queries:
        ref = [scorer.score(p, q)["rougeL"].fmeasure for p in pool]
        best, where = index.max_score(q)
        assert best == max(ref)
        assert where is None or ref[where] == best
        for t in (0.3, 0.7, 0.95):  # the length window never hides an item at the threshold
            assert (index.max_score(q, t)[0] >= t) == (max(ref) >= t)


def test_filter_drops_planted_near_duplicates_and_keeps_distinct_tasks():
    seeds = [Task("Write a short poem about the sea at night.", "", "Waves...")]
    pool = TaskPool(seeds, threshold=0.7)
    distinct = [
        Task("Translate the sentence into German.", "Good morning", "Guten Morgen"),
        Task("List three uses of a paper clip.", "", "1. hold paper"),
        Task("Explain why leaves change colour in autumn.", "", "Chlorophyll breaks down."),
    ]
    planted = [
        Task("Write a short poem about the sea at night!", "", "x"),  # seed, punctuation
        Task("Please write a short poem about the sea at night.", "", "x"),
        Task("List three uses for a paper clip.", "", "x"),  # near the kept task
    ]
    for t in distinct:
        assert pool.verdict(t) is None
        pool.add(t)
    assert [pool.verdict(t) for t in planted] == ["near_duplicate"] * 3
    assert pool.verdict(Task("Translate the sentence into German.", "Good morning", "y")) == (
        "exact_duplicate"
    )
    assert pool.verdict(Task("Describe the image above.", "", "y")) == "needs_non_text"
    assert pool.verdict(Task("Add two numbers.", "", "")) == "empty"
    assert pool.verdict(Task("Sum it", "", "y")) == "too_short"
    assert pool.verdict(Task("- list three colours", "", "red")) == "bad_start"


# ---------------------------------------------------------------- parsing and the loop


def test_parse_completion_cuts_tasks_and_marks_truncated_and_unparsable():
    text = (
        " Name a fruit.\n4. Input:\n<noinput>\n4. Output:\nApple.\n"
        "5. Instruction: Add 2 and 3.\n5. Input:\n2, 3\n5. Output:\n5\n###\nno fields here\n###\n"
        "7. Instruction: Count to"
    )
    got = parse_completion(Completion(text, "length"), 4)
    assert got[:2] == [Task("Name a fruit.", "", "Apple."), Task("Add 2 and 3.", "2, 3", "5")]
    assert got[2:] == ["unparsable", "truncated"]
    assert parse_completion(Completion(text, "stop"), 4)[-1] == "unparsable"


def test_shipped_seed_tasks_are_varied_and_valid():
    tasks = read_seed_tasks(SEED_TASKS)
    assert 35 <= len(tasks) <= 50
    with_input = sum(bool(t.input) for t in tasks)
    assert 10 <= with_input <= len(tasks) - 10
    kinds = {json.loads(line)["kind"] for line in SEED_TASKS.read_text().splitlines()}
    assert len(kinds) >= 15
    prompt = build_prompt(tasks[:3])
    assert prompt.endswith("\n###\n4. Instruction:") and tasks[2].instruction in prompt
    pool = TaskPool([], 0.7)  # no two seeds are near-duplicates of each other
    for t in tasks:
        assert pool.verdict(t) is None, t
        pool.add(t)


def test_bad_seed_file_names_file_and_line(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "a b c", "output": "x"}\n{"instruction": "no output"}\n')
    with pytest.raises(Exception, match=r"seeds.jsonl:2"):
        read_seed_tasks(bad)


class Scripted:
    """A deterministic generator: task texts derived from the prompt seeds, some bad."""

    name = "scripted"

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at

    def complete(self, prompts, params: GenParams):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt  # the run is killed in the middle of a batch
        out = []
        for seed in params.seeds:
            rng = random.Random(seed)
            words = rng.sample(WORDS[:24], 6)
            good = f" Explain {' '.join(words)} briefly.\n9. Input:\n<noinput>\n9. Output:\nOk.\n"
            dup = f"###\n10. Instruction: Explain {' '.join(words)} briefly!\n10. Output:\nOk\n"
            out.append(Completion(good + dup + "###\n11. Instruction: Show the image", "length"))
        return out


def _cfg(tmp_path: Path, **kw) -> SelfInstructConfig:
    return SelfInstructConfig(num=12, out=tmp_path / "data.json", batch=3, **kw)


def test_run_writes_alpaca_file_counts_reasons_and_resumes_after_a_kill(tmp_path):
    straight = self_instruct(Scripted(), _cfg(tmp_path / "a"))
    assert straight["kept"] == 12 and straight["complete"]
    assert straight["dropped"]["near_duplicate"] >= 1 and straight["dropped"]["truncated"] >= 1
    cfg = _cfg(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        self_instruct(Scripted(fail_at=3), cfg)
    partial = json.loads(cfg.out.read_text())  # never half a file: valid JSON at the kill
    state = json.loads(progress_path(cfg.out).read_text())
    assert 0 < len(partial) < 12 and state["batches"] == 2 and state["kept"] == len(partial)
    resumed = self_instruct(Scripted(), cfg)
    assert resumed["kept"] == 12 and resumed["dropped"] == straight["dropped"]
    assert cfg.out.read_text() == (tmp_path / "a" / "data.json").read_text()
    again = self_instruct(Scripted(), cfg)  # complete: nothing more to do
    assert again["kept"] == 12 and again["prompts"] == resumed["prompts"]


def test_output_is_read_by_data_format_alpaca(tmp_path):
    self_instruct(Scripted(), _cfg(tmp_path))
    from llamaforge.data.tokenizer import load_tokenizer

    tok = load_tokenizer(FIX / "tiny_tokenizer" / "tokenizer.json")
    spec = {"path": str(tmp_path / "data.json"), "format": "alpaca", "val_size": 0.0}
    splits = build_dataset(spec, tok, use_cache=False)
    assert len(splits.train) == 12 and splits.report.skipped == {}


def test_existing_foreign_file_is_not_overwritten(tmp_path):
    out = tmp_path / "data.json"
    out.write_text("[]")
    with pytest.raises(Exception, match="not written by self-instruct"):
        self_instruct(Scripted(), SelfInstructConfig(num=2, out=out))


# ---------------------------------------------------------------- generators


def _tiny_base(d: Path) -> Path:
    """A tiny HF folder whose context holds the self-instruct prompt."""
    import shutil

    save_hf(random_model("tiny-llama3", seed=3, max_seq_len=2048), d)
    shutil.copy(FIX / "tiny_tokenizer" / "tokenizer.json", d / "tokenizer.json")
    return d


def _tiny_seeds(tmp_path: Path) -> Path:
    seeds = tmp_path / "seeds.jsonl"
    rows = [
        {"instruction": "Name a colour of the sky.", "input": "", "output": "Blue."},
        {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "5"},
    ]
    seeds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return seeds


def test_local_generator_batches_with_seeds_and_reports_length(tmp_path):
    gen = LocalGenerator.load(str(_tiny_base(tmp_path / "base")), chat=False, max_batch=4)
    params = GenParams(max_tokens=12, temperature=1.0, seeds=[1, 2, 1])
    a = gen.complete(["hello there", "abc", "hello there"], params)
    assert a[0] == a[2] and a[0].finish_reason in ("length", "stop")
    assert gen.complete(["hello there"], GenParams(max_tokens=12, seeds=[1]))[0] == a[0]


def test_cli_local_model_run_writes_valid_file_and_resumes(tmp_path, capsys):
    base = _tiny_base(tmp_path / "base")
    out = tmp_path / "gen.json"
    argv = ["self-instruct", "--model", str(base), "--num", "3", "--out", str(out)]
    argv += ["--seed-tasks", str(_tiny_seeds(tmp_path)), "--batch", "2", "--max-tokens", "24"]
    assert main(argv + ["--max-prompts", "2"]) == 0
    first = json.loads(capsys.readouterr().out)
    rows = json.loads(out.read_text())  # a random tiny model writes no usable task, but
    assert isinstance(rows, list) and len(rows) == first["kept"]  # the file is valid
    assert first["prompts"] == 2 and sum(first["dropped"].values()) >= 2
    assert main(argv + ["--max-prompts", "4"]) == 0  # resumes: two more prompts, not four
    second = json.loads(capsys.readouterr().out)
    assert second["prompts"] == 4
    assert sum(second["dropped"].values()) > sum(first["dropped"].values())


def test_cli_bad_flags_exit_2(tmp_path, capsys):
    out = str(tmp_path / "x.json")
    assert main(["self-instruct", "--model", "m", "--num", "0", "--out", out]) == 2
    assert "--num must be >= 1" in capsys.readouterr().err
    bad = tmp_path / "s.json"
    bad.write_text('[{"instruction": "x y z"}]')
    assert (
        main(
            ["self-instruct", "--model", "m", "--num", "2", "--out", out, "--seed-tasks", str(bad)]
        )
        == 2
    )
    assert "s.json" in capsys.readouterr().err


def test_endpoint_generator_through_llamaforge_serve_and_openai(tmp_path):
    from llamaforge.serve.launch import build

    base = _tiny_base(tmp_path / "base")
    app, _engine, model_id = build(serve_args(base, "--api-key", KEY, "--max-len", "2048"))
    with LiveServer(app) as srv:
        for chat in (False, True):
            gen = EndpointGenerator(f"{srv.url}/v1", model_id, api_key=KEY, chat=chat)
            params = GenParams(max_tokens=8, temperature=1.0, seeds=[5, 6, 5])
            out = gen.complete(["Name a colour.", "abc", "Name a colour."], params)
            assert out[0] == out[2] and all(c.finish_reason in ("stop", "length") for c in out)
        cfg = SelfInstructConfig(num=2, out=tmp_path / "e.json", seed_tasks=_tiny_seeds(tmp_path))
        cfg.batch, cfg.max_tokens, cfg.max_prompts = 2, 16, 2
        summary = self_instruct(EndpointGenerator(f"{srv.url}/v1", model_id, api_key=KEY), cfg)
        assert summary["prompts"] == 2 and isinstance(json.loads(cfg.out.read_text()), list)
        bad = EndpointGenerator(f"{srv.url}/v1", model_id, api_key="wrong")
        with pytest.raises(Exception, match="HTTP 401"):
            bad.complete(["x"], GenParams(max_tokens=4))


def test_endpoint_with_a_fake_openai_server_parses_its_tasks(tmp_path):
    """A FastAPI stand-in for a bigger model: the real openai client, real task text."""
    from fastapi import FastAPI

    app = FastAPI()
    seen = []

    @app.post("/v1/completions")
    async def completions(body: dict):
        seen.append(body)
        k = len(seen)
        topic = ["prime numbers", "rivers of Africa", "kinds of cheese"][(k - 1) % 3]
        text = f" List two {topic}.\n9. Input:\n<noinput>\n9. Output:\n2, 3\n###\n"
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        return {
            "id": f"c{k}",
            "object": "text_completion",
            "created": 0,
            "model": body["model"],
            "choices": [choice],
        }

    with LiveServer(app) as srv:
        cfg = SelfInstructConfig(num=3, out=tmp_path / "f.json", seed_tasks=_tiny_seeds(tmp_path))
        cfg.batch = 1
        summary = self_instruct(EndpointGenerator(f"{srv.url}/v1", "big-model"), cfg)
    rows = json.loads(cfg.out.read_text())
    assert summary["kept"] == 3 and rows[0] == {
        "instruction": "List two prime numbers.",
        "input": "",
        "output": "2, 3",
    }
    assert seen[0]["model"] == "big-model" and seen[0]["prompt"].endswith("3. Instruction:")
    assert isinstance(seen[0]["seed"], int)


def test_parser_lists_the_verb():
    args = build_parser().parse_args(["self-instruct", "--model", "m", "--num", "1", "--out", "o"])
    assert args.api == "completions" and args.threshold == 0.7
