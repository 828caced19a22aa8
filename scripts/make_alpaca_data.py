"""Build an Alpaca-format JSON file from the chatterbot-corpus package's YAML conversations.

Source: the PyPI package ``chatterbot-corpus==1.3.3`` (BSD), files
``chatterbot_corpus/data/<language>/*.yml``; install it with
``pip install --no-deps chatterbot-corpus==1.3.3`` (listed in requirements/assets.txt).
The files are found through the package's metadata; the package itself is never imported.

Each conversation (a list of lines) becomes one example: the first line is the
``instruction``, the remaining lines joined by newlines are the ``output``, ``input`` is
empty. Malformed entries (not a list, fewer than two lines, a non-text or empty line) are
skipped, counted per reason and printed.

    python scripts/make_alpaca_data.py [--out data/chatterbot_alpaca.json] [--language english]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

DIST = "chatterbot-corpus"
VERSION = "1.3.3"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "data" / "chatterbot_alpaca.json"


def corpus_files(language: str) -> list[Path]:
    """The package's YAML files for one language, sorted by name."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"error: the {DIST} package is not installed: pip install --no-deps {DIST}=={VERSION}"
        ) from None
    folder = Path(str(dist.locate_file(f"chatterbot_corpus/data/{language}")))
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise SystemExit(f"error: no *.yml files in {folder} (is {language!r} a corpus language?)")
    return files


def convert(conversation: Any) -> dict[str, str] | str:
    """An Alpaca example from one conversation, or the reason it is malformed."""
    if not isinstance(conversation, list):
        return "not a list of lines"
    if len(conversation) < 2:
        return "fewer than two lines"
    if not all(isinstance(line, str) for line in conversation):
        return "a line is not text"
    lines = [line.strip() for line in conversation]
    if not all(lines):
        return "an empty line"
    return {"instruction": lines[0], "input": "", "output": "\n".join(lines[1:])}


def read_file(path: Path, skipped: Counter, notes: list[str]) -> list[dict[str, str]]:
    """Examples of one YAML file; malformed entries are counted in ``skipped``."""
    try:
        # BaseLoader keeps every scalar a string: a reply such as "No" or "42" stays text.
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        skipped["unreadable file"] += 1
        notes.append(f"{path.name}: unreadable file: {str(e).splitlines()[0]}")
        return []
    conversations = doc.get("conversations") if isinstance(doc, dict) else None
    if not isinstance(conversations, list):
        skipped["file without a conversations list"] += 1
        notes.append(f"{path.name}: no 'conversations' list")
        return []
    out = []
    for i, conversation in enumerate(conversations):
        result = convert(conversation)
        if isinstance(result, str):
            skipped[result] += 1
            notes.append(f"{path.name}: conversations[{i}]: {result}: {conversation!r:.80}")
        else:
            out.append(result)
    return out


def build(language: str) -> tuple[list[dict[str, str]], Counter, list[str], int]:
    """(examples, skipped counts per reason, one note per skipped entry, files read)."""
    skipped: Counter = Counter()
    notes: list[str] = []
    files = corpus_files(language)
    examples = [ex for path in files for ex in read_file(path, skipped, notes)]
    return examples, skipped, notes, len(files)


def write_json(path: Path, examples: list[dict[str, str]]) -> None:
    """Write atomically (a temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(examples, f, ensure_ascii=False, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    parser.add_argument("--language", default="english", help="corpus folder (default: english)")
    args = parser.parse_args(argv)

    examples, skipped, notes, n_files = build(args.language)
    if not examples:
        print("error: no usable conversations found", file=sys.stderr)
        return 1
    write_json(args.out, examples)
    print(f"wrote {args.out}: {len(examples)} examples from {n_files} files")
    total = sum(skipped.values())
    print(f"skipped {total} malformed entries" + (":" if total else ""))
    for reason, count in sorted(skipped.items()):
        print(f"  {reason}: {count}")
    for note in notes:
        print(f"    {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
