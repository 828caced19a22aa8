"""Text generation with a KV cache: batched greedy / temperature / top-k / top-p sampling.

Prompts of different lengths are left-padded into one batch. Each row's positions start at 0
on its first real token and pad keys are masked out, so a row generates exactly what it would
alone. One preallocated KVCache holds prompt + new tokens; the prompt is run once (prefill),
then one token per step for every row until all rows have stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .llama import KVCache, Llama, padded_causal_mask

Decode = Callable[[list[int]], str]
OnToken = Callable[[int, int], None]


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy; top_k 0 and top_p 1.0 turn those filters off.
    repetition_penalty is CTRL's, as transformers applies it: for every token already in the
    row (prompt or generated), a positive logit is divided by it and a negative one multiplied.
    stop_ids end a row (eos / end-of-turn); stop_strings need a `decode` function.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_ids: Collection[int] = ()
    stop_strings: Sequence[str] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings may not contain an empty string")


# ----------------------------------------------------------------------------- sampling


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Penalise seen tokens: logits (B, V) float, seen bool (B, V); returns a new tensor."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass strictly ahead of each token
    drop_sorted = before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row (B,) from float32 logits (B, V), in transformers' processor order."""
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- batch layout


@dataclass
class _Batch:
    """Left-padded prompts and the per-row bookkeeping derived from them."""

    ids: torch.Tensor  # (B, P) token ids, pads on the left
    key_ok: torch.Tensor  # (B, P + N) bool: False on pad keys, True on real and new tokens
    lens: torch.Tensor  # (B,) real prompt lengths
    padded: bool  # whether any row has padding

    @property
    def prompt_len(self) -> int:
        """Length P of the padded prompt block."""
        return self.ids.shape[1]


def _left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, new: int, device: torch.device
) -> _Batch:
    """Pack prompts into a left-padded batch with room for `new` tokens in the key mask."""
    lens = [len(p) for p in prompts]
    if not prompts or min(lens) == 0:
        raise ValueError("generate needs at least one prompt and no prompt may be empty")
    width = max(lens)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    key_ok = torch.ones((len(prompts), width + new), dtype=torch.bool)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        key_ok[r, : width - len(p)] = False
    lens_t = torch.tensor(lens, dtype=torch.long)
    return _Batch(ids.to(device), key_ok.to(device), lens_t.to(device), min(lens) != width)


def _seen_tokens(batch: _Batch, vocab: int) -> torch.Tensor:
    """Bool (B, V): which tokens occur in each row's real prompt."""
    counts = torch.zeros((batch.ids.shape[0], vocab), dtype=torch.int32, device=batch.ids.device)
    real = batch.key_ok[:, : batch.prompt_len].to(torch.int32)
    return counts.scatter_add_(1, batch.ids, real) > 0


# ----------------------------------------------------------------------------- stopping


@dataclass
class _Rows:
    """Per-row output and stop state, updated once per step on the host."""

    params: SamplingParams
    decode: Decode | None
    on_token: OnToken | None
    out: list[list[int]]
    done: list[bool] = field(init=False)
    stop_ids: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self.done = [self.params.max_new_tokens == 0] * len(self.out)
        self.stop_ids = frozenset(int(t) for t in self.params.stop_ids)
        if self.params.stop_strings and self.decode is None:
            raise ValueError("SamplingParams.stop_strings needs generate(..., decode=fn)")

    def accept(self, tokens: list[int]) -> bool:
        """Record one new token per row; return True when every row is done."""
        for r, t in enumerate(tokens):
            if not self.done[r]:
                self._accept_one(r, t)
        return all(self.done)

    def _accept_one(self, r: int, t: int) -> None:
        if t in self.stop_ids:
            self.done[r] = True
            return
        row = self.out[r]
        row.append(t)
        if self.on_token is not None:
            self.on_token(r, t)
        if self.params.stop_strings:
            cut = _cut_at_stop_string(row, self.decode, self.params.stop_strings)
            if cut is not None:
                del row[cut:]
                self.done[r] = True
                return
        if len(row) >= self.params.max_new_tokens:
            self.done[r] = True


def _cut_at_stop_string(tokens: list[int], decode: Decode, stops: Sequence[str]) -> int | None:
    """Number of tokens to keep if a stop string just appeared in the decoded text, else None.

    Only a tail is decoded per step; once a stop string shows, the tokens from the first one
    whose text reaches into it are dropped.
    """
    window = max(len(s) for s in stops) + 8
    tail = decode(tokens[-window:])
    if not any(s in tail for s in stops):
        return None
    text = decode(tokens)
    start = min((text.find(s) for s in stops if s in text), default=len(text))
    keep = len(tokens) - 1
    while keep > 0:
        prefix = decode(tokens[:keep])
        if len(prefix) <= start and not any(s in prefix for s in stops):
            break
        keep -= 1
    return keep


# ----------------------------------------------------------------------------- the loop

# cuDNN attention builds a new graph for every key length, i.e. every decode step (~2 ms per
# layer on an H100); the flash / memory-efficient kernels need no such set-up.
_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _prefill(model: Llama, batch: _Batch, cache: KVCache) -> torch.Tensor:
    """Run the prompts through the model into the cache; float32 logits (B, V) of the last one."""
    p = batch.prompt_len
    if batch.padded:
        positions = (batch.key_ok[:, :p].cumsum(-1) - 1).clamp_min(0)  # (B, P), 0 at 1st real
        mask = padded_causal_mask(batch.key_ok[:, :p], p, 0)  # (B, 1, P, P)
        hidden = model.hidden_states(batch.ids, positions=positions, mask=mask, cache=cache)
    else:
        hidden = model.hidden_states(batch.ids, cache=cache)  # plain causal: SDPA's fast path
    return model.lm_head(hidden[:, -1]).float()  # only the last position: (B, V)


def _step(
    model: Llama, tokens: torch.Tensor, positions: torch.Tensor, batch: _Batch, cache: KVCache
) -> torch.Tensor:
    """Feed one token per row (B,) at positions (B,); float32 logits (B, V) of the next one."""
    s = cache.length + 1
    mask = batch.key_ok[:, None, None, :s] if batch.padded else None  # (B, 1, 1, S)
    logits = model(tokens[:, None], positions=positions[:, None], mask=mask, cache=cache)
    return logits[:, -1].float()


def _sampling_state(
    model: Llama, batch: _Batch, params: SamplingParams
) -> tuple[torch.Generator | None, torch.Tensor | None]:
    """The seeded generator (if a seed is given) and the seen-token mask (if penalising)."""
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=batch.ids.device).manual_seed(params.seed)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = _seen_tokens(batch, model.cfg.vocab_size)
    return gen, seen


@torch.inference_mode()
@sdpa_kernel(_DECODE_BACKENDS)
def _run(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    decode: Decode | None = None,
    on_token: OnToken | None = None,
    keep_logits: bool = False,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """generate() that also returns the float32 logits (B, V) of every step when asked."""
    n, pad_id = params.max_new_tokens, model.cfg.pad_id or 0
    rows = _Rows(params, decode, on_token, [[] for _ in prompts])
    batch = _left_pad(prompts, pad_id, n, model.device)
    if n == 0:
        return rows.out, []
    b, max_len = len(prompts), batch.prompt_len + n
    cache = KVCache(model.cfg, b, max_len, dtype=model.dtype, device=model.device)
    gen, seen = _sampling_state(model, batch, params)
    logits = _prefill(model, batch, cache)
    positions = batch.lens.clone()  # (B,) position of the token fed next
    history: list[torch.Tensor] = []
    for step in range(n):
        if keep_logits:
            history.append(logits)
        tokens = sample_next(logits, params, seen, gen)  # (B,)
        if rows.accept(tokens.tolist()) or step == n - 1:
            break
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)
        if any(rows.done):  # frozen rows keep feeding a pad; their output has ended
            tokens = tokens.masked_fill(torch.tensor(rows.done, device=model.device), pad_id)
        logits = _step(model, tokens, positions, batch, cache)
        positions += 1
    return rows.out, history


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    decode: Decode | None = None,
    on_token: OnToken | None = None,
) -> list[list[int]]:
    """New token ids per prompt, without the stop id or stop string that ended a row.

    Rows end at a stop id (not included), at a stop string (the tokens from the first one
    whose text reaches into the stop string are dropped; needs `decode`), or after
    `max_new_tokens`. on_token(row, token_id) is called for each token as it is generated,
    never for a stop id; tokens later cut for a stop string have already been passed to it,
    so streaming callers should use TextStream(decode, stop_strings) to hold text back.
    """
    return _run(model, prompts, params, decode, on_token)[0]


# ----------------------------------------------------------------------------- streaming


class TextStream:
    """Incremental detokenizer: push token ids, get back the new printable text.

    Text is released only once it no longer ends in U+FFFD (a multi-byte character split
    across tokens), and, when stop strings are given, only once it cannot be the start of
    one; after a stop string nothing more is released.
    """

    def __init__(self, decode: Decode, stop_strings: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.tokens: list[int] = []
        self.prefix = 0  # tokens before this index are context only
        self.read = 0  # tokens before this index have been turned into text
        self.pending = ""  # decoded text held back for stop strings
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text now safe to show (possibly empty)."""
        if self.stopped:
            return ""
        self.tokens.append(int(token))
        before = self.decode(self.tokens[self.prefix : self.read])
        now = self.decode(self.tokens[self.prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.pending += now[len(before) :]
        self.prefix, self.read = self.read, len(self.tokens)
        return self._release()

    def flush(self) -> str:
        """Text still held back at the end of generation (empty after a stop string)."""
        if self.stopped:
            return ""
        held = self.decode(self.tokens[self.prefix : self.read])
        self.pending += self.decode(self.tokens[self.prefix :])[len(held) :]
        self.prefix = self.read = len(self.tokens)
        out = self._release()
        out, self.pending = out + self.pending, ""
        return out

    def _release(self) -> str:
        """Split pending text into what can be shown and what might begin a stop string."""
        hits = [self.pending.find(s) for s in self.stop_strings if s in self.pending]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = _longest_stop_prefix(self.pending, self.stop_strings)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out


def _longest_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def stream_text(
    tokens: Iterable[int], decode: Decode, stop_strings: Sequence[str] = ()
) -> Iterator[str]:
    """Yield printable text pieces as tokens arrive (see TextStream); empty pieces skipped."""
    stream = TextStream(decode, stop_strings)
    for t in tokens:
        piece = stream.push(t)
        if piece:
            yield piece
    rest = stream.flush()
    if rest:
        yield rest
