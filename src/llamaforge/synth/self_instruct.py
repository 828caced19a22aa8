"""Self-instruct: grow an Alpaca-format instruction set from a few seed tasks with a model.

Loop (as Stanford Alpaca did it, in our own prompt and code): each prompt shows a few tasks
sampled from the seeds and from what was generated so far, numbered, and asks the model to
go on with more; the completion is cut into tasks (instruction, input, output) and every
task passes the filters below or is dropped and counted under its reason:

- ``unparsable``: a block without the Instruction / Output fields;
- ``empty``: an empty instruction or output;
- ``too_short`` / ``too_long``: instructions of fewer than 3 or more than 150 words;
- ``needs_non_text``: the instruction asks for something a text model cannot do (images,
  audio, files, browsing: a keyword list);
- ``bad_start``: the instruction starts with punctuation or a non-ASCII character;
- ``truncated``: the last task of a completion that hit the token limit;
- ``exact_duplicate``: the same instruction and input as a kept (or seed) task;
- ``near_duplicate``: ROUGE-L >= ``threshold`` (0.7) with any kept or seed instruction
  (`rouge.RougeIndex`, values equal to rouge-score's).

Output: the kept tasks as an Alpaca JSON list (``data.format: alpaca`` reads it as it is),
rewritten atomically after every batch, and beside it ``<out>.progress.json`` (batches done,
counts per reason). A killed run started again with the same arguments continues from the
last batch written; every batch has its own seeds, so the result equals an uninterrupted
run's (with a deterministic generator).
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import UserError
from ..io.atomic import write_text_atomic
from .generators import Completion, Generator, GenParams
from .rouge import RougeIndex

SEED_TASKS = Path(__file__).with_name("seed_tasks.jsonl")
NO_INPUT = "<noinput>"
REASONS = (
    "unparsable",
    "empty",
    "too_short",
    "too_long",
    "needs_non_text",
    "bad_start",
    "truncated",
    "exact_duplicate",
    "near_duplicate",
)
NON_TEXT = re.compile(
    r"\b(image|images|picture|pictures|photo|photos|photograph|drawing|draw|sketch|paint|"
    r"graph|graphs|chart|charts|plot|diagram|flowchart|map|maps|video|videos|audio|sound|"
    r"record|recording|listen|file|files|attach|attached|upload|download|website|url|"
    r"browse|go to)\b",
    re.IGNORECASE,
)
_BLOCK = re.compile(
    r"^\s*(?:\d+\s*[.)]\s*)?Instruction\s*:(?P<instruction>.*?)"
    r"(?:^\s*(?:\d+\s*[.)]\s*)?Input\s*:(?P<input>.*?))?"
    r"^\s*(?:\d+\s*[.)]\s*)?Output\s*:(?P<output>.*)",
    re.IGNORECASE | re.MULTILINE | re.DOTALL,
)
# a new task starts at a ### line or at the next numbered "N. Instruction:" line
_SEPARATOR = re.compile(r"^\s*#{3,}\s*$|^(?=\s*\d+\s*[.)]\s*Instruction\s*:)", re.MULTILINE)
INTRO = (
    "Write new, varied tasks for a text assistant. Each task has an instruction, an input "
    "(write {no_input} when the task needs none) and a good output. Mix many kinds of tasks: "
    "questions, explanations, rewriting, classification, extraction, brainstorming, simple "
    "math, short code, creative writing, advice. Word every instruction differently, in one "
    "or two sentences, and make each task doable from text alone (no pictures, sound, files "
    "or web browsing). Keep outputs short and correct."
)


@dataclass(frozen=True)
class Task:
    """One instruction, its input ("" when none) and the output."""

    instruction: str
    input: str
    output: str

    def key(self) -> str:
        """What makes two tasks exact duplicates: normalised instruction and input."""
        return " ".join(f"{self.instruction}\n{self.input}".lower().split())


@dataclass
class SelfInstructConfig:
    """Settings of a self-instruct run (the CLI flags of `llamaforge self-instruct`)."""

    num: int
    out: Path
    seed_tasks: Path = SEED_TASKS
    prompt_tasks: int = 3  # tasks shown in each prompt
    prompt_generated: int = 1  # of which at most this many are generated ones
    batch: int = 8  # prompts per generator call
    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    threshold: float = 0.7
    seed: int = 0
    max_prompts: int | None = None  # give up after this many prompts (default 10 * num + 50)
    overwrite: bool = False

    def check(self) -> None:
        """Reject impossible settings with the flag's name."""
        for flag, v, low in (
            ("--num", self.num, 1),
            ("--prompt-tasks", self.prompt_tasks, 1),
            ("--prompt-generated", self.prompt_generated, 0),
            ("--batch", self.batch, 1),
            ("--max-tokens", self.max_tokens, 16),
        ):
            if v < low:
                raise UserError(f"{flag} must be >= {low}, got {v}")
        if not 0 < self.threshold <= 1:
            raise UserError(f"--threshold must be in (0, 1], got {self.threshold}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise UserError(f"--max-prompts must be >= 1, got {self.max_prompts}")


def read_seed_tasks(path: str | Path) -> list[Task]:
    """Seed tasks from an Alpaca JSON/JSONL/CSV file; a bad row is a `file:line` error."""
    from ..data.formats import to_alpaca
    from ..data.sources import BadRow, DataError, read_rows

    tasks = []
    for row in read_rows(path):
        try:
            if row.error is not None:
                raise row.error
            a = to_alpaca(row.data)
        except BadRow as e:
            raise DataError(row.where, e.reason, e.detail) from None
        tasks.append(Task(a.instruction.strip(), _clean_input(a.input), a.output.strip()))
    if not tasks:
        raise UserError(f"--seed-tasks {path}: no tasks")
    return tasks


def _clean_input(text: str) -> str:
    text = text.strip()
    return "" if text.lower().strip("<>() .") in ("noinput", "no input", "none", "") else text


def render_task(i: int, t: Task) -> str:
    """Task `i` in the prompt's numbered layout."""
    return (
        f"{i}. Instruction: {t.instruction}\n{i}. Input:\n{t.input or NO_INPUT}\n"
        f"{i}. Output:\n{t.output}"
    )


def build_prompt(examples: Sequence[Task]) -> str:
    """The generation prompt: the intro, the numbered examples, then the next number."""
    body = "\n###\n".join(render_task(i + 1, t) for i, t in enumerate(examples))
    nxt = len(examples) + 1
    return f"{INTRO.format(no_input=NO_INPUT)}\n\n###\n{body}\n###\n{nxt}. Instruction:"


def parse_completion(completion: Completion, first: int | None) -> list[Task | str]:
    """Tasks found in a completion that continues after `first. Instruction:` (None: a chat
    answer, which writes its own headers). Each block becomes a Task, or a drop reason
    (``unparsable``, ``truncated``).
    """
    text = completion.text if first is None else f"{first}. Instruction:{completion.text}"
    blocks = [b for b in _SEPARATOR.split(text) if b.strip()]
    out: list[Task | str] = []
    for k, block in enumerate(blocks):
        last = k == len(blocks) - 1
        if last and completion.finish_reason == "length":
            out.append("truncated")
            continue
        m = _BLOCK.search(block)
        if m is None:
            out.append("unparsable")
            continue
        out.append(
            Task(
                " ".join(m["instruction"].split()),
                _clean_input(m["input"] or ""),
                m["output"].strip(),
            )
        )
    return out


def drop_reason(t: Task) -> str | None:
    """The content rule a task breaks (duplicates are checked against the pool), or None."""
    if not t.instruction or not t.output:
        return "empty"
    words = len(t.instruction.split())
    if words < 3:
        return "too_short"
    if words > 150:
        return "too_long"
    if NON_TEXT.search(t.instruction):
        return "needs_non_text"
    if not t.instruction[0].isascii() or not t.instruction[0].isalnum():
        return "bad_start"
    return None


class TaskPool:
    """Kept tasks plus the seeds, with the duplicate checks over all of them."""

    def __init__(self, seeds: Sequence[Task], threshold: float) -> None:
        self.seeds, self.kept = list(seeds), []
        self.threshold = threshold
        self.keys = {t.key() for t in seeds}
        self.index = RougeIndex(t.instruction for t in seeds)

    def verdict(self, t: Task) -> str | None:
        """Why `t` cannot join (a REASONS entry), or None."""
        reason = drop_reason(t)
        if reason is not None:
            return reason
        if t.key() in self.keys:
            return "exact_duplicate"
        score, _ = self.index.max_score(t.instruction, self.threshold)
        if score >= self.threshold:
            return "near_duplicate"
        return None

    def add(self, t: Task) -> None:
        """Keep a task that passed `verdict`."""
        self.kept.append(t)
        self.keys.add(t.key())
        self.index.add(t.instruction)


def _batch_rng(cfg: SelfInstructConfig, batch: int) -> random.Random:
    return random.Random(f"self-instruct:{cfg.seed}:{batch}")


def prompt_examples(pool: TaskPool, cfg: SelfInstructConfig, rng: random.Random) -> list[Task]:
    """Tasks shown in one prompt: up to `prompt_generated` kept ones, the rest seeds."""
    n_gen = min(cfg.prompt_generated, len(pool.kept), cfg.prompt_tasks)
    shown = rng.sample(pool.seeds, min(cfg.prompt_tasks - n_gen, len(pool.seeds)))
    shown += rng.sample(pool.kept, n_gen)
    rng.shuffle(shown)
    return shown


def progress_path(out: Path) -> Path:
    """The state file beside the output."""
    return out.with_name(out.name + ".progress.json")


def _load_state(cfg: SelfInstructConfig, pool: TaskPool) -> dict[str, Any]:
    """Resume from the files of an earlier run (or start fresh)."""
    state: dict[str, Any] = {"batches": 0, "prompts": 0, "kept": 0, "dropped": {}, "seconds": 0}
    prog = progress_path(cfg.out)
    if cfg.overwrite or not cfg.out.exists():
        return state
    if not prog.is_file():
        raise UserError(
            f"{cfg.out} exists and was not written by self-instruct ({prog.name} is missing); "
            "use --overwrite or another --out"
        )
    try:
        state.update(json.loads(prog.read_text()))
        rows = json.loads(cfg.out.read_text())
        tasks = [Task(r["instruction"], r.get("input", ""), r["output"]) for r in rows]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{cfg.out}: cannot resume from it ({e}); use --overwrite") from None
    if len(tasks) > state["kept"]:  # killed between the two writes: that batch is in `out`
        state["batches"] += 1
    for t in tasks:
        pool.add(t)
    state["kept"] = len(tasks)
    return state


def _save(cfg: SelfInstructConfig, pool: TaskPool, state: dict[str, Any]) -> None:
    """The data first, then the state that says how far it got (both atomic)."""
    rows = [asdict(t) for t in pool.kept]
    write_text_atomic(cfg.out, json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    write_text_atomic(progress_path(cfg.out), json.dumps(state, indent=1) + "\n")


def self_instruct(
    generator: Generator, cfg: SelfInstructConfig, *, continues: bool = True
) -> dict[str, Any]:
    """Generate until `cfg.num` tasks are kept; returns counts kept and dropped per reason.

    `continues`: the generator continues the prompt's text (a completion), so its output
    starts inside the next instruction; False for chat answers.
    """
    cfg.check()
    pool = TaskPool(read_seed_tasks(cfg.seed_tasks), cfg.threshold)
    state = _load_state(cfg, pool)
    dropped = Counter(state["dropped"])
    max_prompts = cfg.max_prompts or 10 * cfg.num + 50
    start = time.perf_counter() - state["seconds"]
    bar = tqdm(total=cfg.num, initial=min(len(pool.kept), cfg.num), desc="self-instruct")
    while len(pool.kept) < cfg.num and state["prompts"] < max_prompts:
        rng = _batch_rng(cfg, state["batches"])
        n = min(cfg.batch, max_prompts - state["prompts"])
        shown = [prompt_examples(pool, cfg, rng) for _ in range(n)]
        seeds = [rng.getrandbits(31) for _ in range(n)]
        params = GenParams(cfg.max_tokens, cfg.temperature, cfg.top_p, seeds)
        completions = generator.complete([build_prompt(s) for s in shown], params)
        for ex, c in zip(shown, completions, strict=True):
            for item in parse_completion(c, len(ex) + 1 if continues else None):
                if len(pool.kept) >= cfg.num:
                    break
                reason = item if isinstance(item, str) else pool.verdict(item)
                if reason is None:
                    pool.add(item)
                    bar.update(1)
                else:
                    dropped[reason] += 1
        state.update(
            batches=state["batches"] + 1,
            prompts=state["prompts"] + n,
            kept=len(pool.kept),
            dropped=dict(dropped),
            seconds=round(time.perf_counter() - start, 1),
        )
        bar.set_postfix(prompts=state["prompts"], dropped=sum(dropped.values()))
        _save(cfg, pool, state)
    bar.close()
    if not state["batches"]:
        _save(cfg, pool, state)
    return {
        "out": str(cfg.out),
        "generator": generator.name,
        "kept": len(pool.kept),
        "asked": cfg.num,
        "prompts": state["prompts"],
        "dropped": {r: dropped[r] for r in REASONS if dropped[r]},
        "complete": len(pool.kept) >= cfg.num,
        "seconds": state["seconds"],
    }


def add_args(p) -> None:
    """The `llamaforge self-instruct` flags."""
    p.add_argument("--num", type=int, required=True, help="tasks to keep")
    p.add_argument("--out", required=True, help="Alpaca JSON file to write (resumed if there)")
    p.add_argument("--seed-tasks", default=str(SEED_TASKS), help="Alpaca JSON/JSONL seeds")
    p.add_argument("--model", required=True, help="local MODEL, or the model NAME at --endpoint")
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder (local model)")
    p.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL (.../v1)")
    p.add_argument("--api-key", default=None, help="endpoint key (default: $OPENAI_API_KEY)")
    p.add_argument(
        "--api",
        choices=["completions", "chat"],
        default="completions",
        help="continue the prompt as text, or send it as one chat message",
    )
    p.add_argument("--template", default="auto", help="chat format of a local model (--api chat)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch", type=int, default=8, help="prompts per batch (engine rows)")
    p.add_argument("--concurrency", type=int, default=8, help="parallel endpoint requests")
    p.add_argument("--prompt-tasks", type=int, default=3, help="example tasks in each prompt")
    p.add_argument("--prompt-generated", type=int, default=1, help="of which generated ones")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--threshold", type=float, default=0.7, help="ROUGE-L near-duplicate limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompts", type=int, default=None, help="give up after this many")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")


def command(args) -> dict[str, Any]:
    """Run `llamaforge self-instruct` from parsed arguments; returns the summary."""
    import os

    from .generators import EndpointGenerator, LocalGenerator

    cfg = SelfInstructConfig(
        num=args.num,
        out=Path(args.out),
        seed_tasks=Path(args.seed_tasks),
        prompt_tasks=args.prompt_tasks,
        prompt_generated=args.prompt_generated,
        batch=args.batch,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        threshold=args.threshold,
        seed=args.seed,
        max_prompts=args.max_prompts,
        overwrite=args.overwrite,
    )
    cfg.check()
    read_seed_tasks(cfg.seed_tasks)  # a bad seed file fails before the model loads
    chat = args.api == "chat"
    if args.endpoint is not None:
        if args.adapter is not None:
            raise UserError("--adapter is for a local model; with --endpoint name it in --model")
        key = args.api_key or os.environ.get("OPENAI_API_KEY")
        gen: Generator = EndpointGenerator(
            args.endpoint, args.model, api_key=key, chat=chat, concurrency=args.concurrency
        )
    else:
        gen = LocalGenerator.load(
            args.model,
            adapter=args.adapter,
            device=args.device,
            dtype=args.dtype,
            chat=chat,
            template=args.template,
            max_batch=args.batch,
        )
    return self_instruct(gen, cfg, continues=not chat)
