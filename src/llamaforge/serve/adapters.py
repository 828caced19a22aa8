"""Adapters are names, never paths: the checks before a server loads a LoRA folder.

A name matches `[A-Za-z0-9._-]+` (not `.` or `..`). Folders named on the command line
(`--adapter NAME=DIR`) are the operator's choice; a folder loaded at run time by name
(the admin endpoint) must resolve, after following links, to a direct child of
`--adapter-root`. Either way the weights must be `adapter_model.safetensors` (never a pickle),
its real path inside the folder, and `adapter_config.json` must be a LoRA config whose ranks
are at most `max_rank` and whose target modules are the decoder's linear layers. The shapes
against the base are checked when the engine loads it (io.peft).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..adapters.inject import DEFAULT_TARGETS
from ..errors import UserError
from ..io.peft import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


class AdapterRefused(UserError):
    """An adapter name or folder that the server will not load."""


def check_name(name: str) -> str:
    """The name itself if it is a valid adapter name, else AdapterRefused."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", ".."):
        raise AdapterRefused(
            f"adapter name {str(name)[:80]!r} is not allowed: use 1-64 of A-Z a-z 0-9 . _ -"
        )
    return name


def resolve_in_root(root: str | os.PathLike, name: str) -> Path:
    """root/name as a real path, refused unless it is a folder directly inside the root."""
    check_name(name)
    real_root = Path(os.path.realpath(root))
    path = Path(os.path.realpath(real_root / name))
    if path.parent != real_root:
        raise AdapterRefused(f"adapter {name!r} resolves outside the adapter root")
    if not path.is_dir():
        raise AdapterRefused(f"no adapter named {name!r} in the adapter root")
    return path


def check_adapter_dir(path: str | os.PathLike, max_rank: int) -> Path:
    """Refuse a folder without safetensors weights or with a config the server won't run."""
    d = Path(os.path.realpath(path))
    if not d.is_dir():
        raise AdapterRefused(f"{path}: no such adapter folder")
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        f = d / fname
        if not f.is_file() or Path(os.path.realpath(f)).parent != d:
            raise AdapterRefused(f"{path}: needs {fname} inside the folder (safetensors only)")
    config = read_adapter_config(d)
    ranks = [config["r"], *(config.get("rank_pattern") or {}).values()]
    if any(not isinstance(r, int) or r < 1 for r in ranks):
        raise AdapterRefused(f"{path}: ranks must be positive integers, got {ranks}")
    if max(ranks) > max_rank:
        raise AdapterRefused(f"{path}: rank {max(ranks)} > --max-lora-rank {max_rank}")
    targets = config["target_modules"]
    if isinstance(targets, str):
        raise AdapterRefused(f"{path}: a regular expression as target_modules is not served")
    unknown = sorted({t for t in targets if t.rsplit(".", 1)[-1] not in DEFAULT_TARGETS})
    if unknown:
        raise AdapterRefused(
            f"{path}: target modules {unknown} are not served; known: {', '.join(DEFAULT_TARGETS)}"
        )
    return d
