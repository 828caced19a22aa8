"""The decode step in fixed-shape buffers, replayed as CUDA graphs.

A decode step of a large model at small batch is bound by launching its ~20 kernels per
layer from Python, not by the GPU: the plain path (`kv.RowBatch`) builds index tensors
and masks on every step. Here every input of the step lives in a preallocated buffer of a
bucketed shape — rows rounded up to `ROW_BUCKETS`, attended width rounded up to a multiple
of `WIDTH_STEP` — so one captured CUDA graph per (rows, width, adapter columns) replays
the whole forward plus the LM head with a few host-to-device copies.

What a bucket's padding does: rows past the live ones, and rows still reading their prompt
(they feed no token this step), write their key/value to a scratch slot (the pool's last,
never handed to a request) and attend key 0 only; their logits are dropped. Keys past a
row's own position are masked, so a wider bucket changes no real row's attention.

With greedy rows the runner can start the next step before the host has read this one's
tokens (`DecodeRunner.launch_ahead`: the tokens are copied into the next step's inputs on
the device); the engine uses such a step only when nothing about the batch changed, so the
host's per-step bookkeeping overlaps the GPU instead of idling it.

`DecodeRunner(capture=False)` runs the same buffers eagerly: that is how the CPU tests
check this path (CUDA graphs themselves need a GPU; `tests/test_serve_graphs.py` compares
replays with eager runs there).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels import capture_graph, replay_ms, triton_available
from ..kernels.decode_attention import decode_attention_triton
from ..model.llama import Llama
from .kv import SlotPool
from .lora_stack import Selection

ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
WIDTH_STEP = 256
# How a bucket attends its one query per row:
# - "sdpa": scaled_dot_product_attention with the additive mask;
# - "matmuls": scores q @ K^T, float32 softmax, probabilities @ V;
# - "keys_first": the same with the scores as (K @ q^T)^T, a GEMV-shaped product over the keys.
# Which is fastest depends on rows, width and GPU: H200, 8B shapes, the matmuls took 17 vs
# 35 us a layer at one row in the pieces alone (benchmarks/decode_pieces.py), but 280 us
# against SDPA's ~105 at 64 rows in the engine, on the pool's strided keys (profile of
# 2026-12-03), where q @ K^T alone took 22.5 us a layer at one row. Captured buckets time
# the three on the device once and keep the fastest (`fastest_attention`); eager static
# runs (and the CPU) take the rule below.
ATTENTION = ("sdpa", "matmuls", "keys_first")  # "sdpa" with a bool mask, as measured
# - "triton": kernels/decode_attention.py, two kernels reading each row's keys up to its
#   position (no mask), q and the new key rotated (RoPE) and the new key/value stored by the
#   first; timed with the others where Triton runs on the device (on the H200 it won every
#   bucket, 1 to 64 rows, 2026-12-03)
TRITON_ATTENTION = "triton"
MATMUL_ROWS = 8  # the rule: matmuls up to this many rows, sdpa above


def default_attention(rows: int) -> str:
    """The attention of an untimed bucket."""
    return "matmuls" if rows <= MATMUL_ROWS else "sdpa"


def row_bucket(n: int, max_batch: int) -> int:
    """Smallest bucket holding n rows (max_batch itself past the last one that fits)."""
    return next((b for b in ROW_BUCKETS if n <= b <= max_batch), max_batch)


class StaticDecode:
    """One bucket's inputs (the model forward's `cache` argument): B rows, width W.

    ids/positions (B, 1); write_slot/write_pos (B,) where each row's new key/value goes;
    seen (B, 1, 1, W) bool, the keys each row sees (SDPA's mask, as measured), and bias, the
    same as an additive 0 / -inf in the model's dtype (the matmul variants); lora_mask
    (B, 1, cols) or None: the adapter columns of each row (see `lora_stack.Selection`).
    `attention` names the variant this bucket runs.
    """

    length = 0  # Llama.hidden_states advances this; positions are given explicitly

    def __init__(self, pool: SlotPool, rows: int, width: int, cols: int, dtype: torch.dtype):
        dev = pool.device
        self.pool, self.rows, self.width, self.cols = pool, rows, width, cols
        self.scratch = pool.slots - 1
        # ids, positions, write slots, write positions and each row's first adapter column:
        # one buffer, one copy a step
        self.ints = torch.zeros(5, rows, dtype=torch.long, device=dev)
        self.ints[2] = self.scratch
        self.ids, self.positions = self.ints[0].view(rows, 1), self.ints[1].view(rows, 1)
        self.write_slot, self.write_pos = self.ints[2], self.ints[3]
        self.attention = default_attention(rows)
        self.gemv = False  # one-row buckets: projections through kernels/gemv.py (timed)
        self.seen = torch.zeros(rows, 1, 1, width, dtype=torch.bool, device=dev)
        self.seen[..., 0] = True
        self.bias = torch.full((rows, 1, 1, width), float("-inf"), dtype=dtype, device=dev)
        self.bias[..., 0] = 0.0
        self.lora_mask = torch.zeros(rows, 1, cols, dtype=dtype, device=dev) if cols else None
        self._keys = torch.arange(width)
        self._mask_rows: tuple | None = None  # the rows' adapter slots lora_mask now holds

    def fill(self, tokens: list[int | None], starts: list[int], lora_slots: list[int | None],
             rank: int) -> None:  # fmt: skip
        """Row i feeds tokens[i] at position starts[i] into slot i (None: feeds nothing).

        One host-to-device copy for the integers; the key mask only for the variants that
        read one (the Triton kernel bounds each row by its write position); the adapter
        mask only when the rows' adapters changed."""
        n, b = len(tokens), self.rows
        pad = [0] * (b - n)
        pos = [s if t is not None else 0 for t, s in zip(tokens, starts, strict=True)] + pad
        ids = [t or 0 for t in tokens] + pad
        slot = [i if t is not None else self.scratch for i, t in enumerate(tokens)]
        slot += [self.scratch] * (b - n)
        col0 = [0 if s is None else s * rank for s in lora_slots] + pad
        self.ints.copy_(torch.tensor([ids, pos, slot, pos, col0]), non_blocking=True)
        if self.attention != TRITON_ATTENTION:
            seen = self._keys[None, :] <= torch.tensor(pos)[:, None]
            if self.attention == "sdpa":  # each variant reads one of the two masks
                self.seen.copy_(seen[:, None, None], non_blocking=True)
            else:
                bias = torch.zeros(seen.shape, dtype=self.bias.dtype)
                self.bias.copy_(bias.masked_fill_(~seen, -torch.inf)[:, None, None],
                                non_blocking=True)  # fmt: skip
        if self.lora_mask is not None:
            key = (*lora_slots, *([None] * (b - n)))
            if key != self._mask_rows:
                want = torch.tensor([-1 if s is None else s for s in key])
                cols = torch.arange(self.cols) // rank
                sel = (cols[None, :] == want[:, None]).to(self.lora_mask.dtype)[:, None]
                self.lora_mask.copy_(sel, non_blocking=True)
                self._mask_rows = key

    @property
    def rope_in_attend(self) -> bool:
        """Whether `attend` rotates q and k itself (the Triton variant: `Attention` then
        hands them over unrotated with the tables, one kernel fewer a layer)."""
        return self.attention == TRITON_ATTENTION

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Store each row's k/v (B, K, 1, D), attend q (B, H, 1, D): out (B, 1, H*D).
        `rope` = (cos, sin): q and k are not rotated yet (only where `rope_in_attend`)."""
        b, h, _, d = q.shape
        n_kv = k.shape[1]
        pk, pv = self.pool.k[layer], self.pool.v[layer]
        keys, values = pk[:b, :, : self.width], pv[:b, :, : self.width]
        if self.attention == TRITON_ATTENTION:  # rows see keys 0..their position; the kernel
            # also stores each row's new key/value (the two index_puts below, fused in)
            new = (k[:, :, 0], v[:, :, 0], self.write_slot)
            out = decode_attention_triton(
                q.reshape(b, h, d), keys, values, self.write_pos, new, rope
            )
            return out.view(b, 1, h * d)
        if rope is not None:
            raise ValueError(f"attention {self.attention!r} takes rotated q and k")
        pk[self.write_slot, :, self.write_pos] = k[:, :, 0]
        pv[self.write_slot, :, self.write_pos] = v[:, :, 0]
        q = q.reshape(b, n_kv, h // n_kv, d)  # the query heads sharing a kv head, as queries
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.seen)
        else:  # see ATTENTION
            if self.attention == "keys_first":
                scores = torch.matmul(keys, q.transpose(-1, -2)).transpose(-1, -2).float()
            else:
                scores = torch.matmul(q, keys.transpose(-1, -2)).float()  # (B, K, rep, W)
            scores.mul_(d**-0.5).add_(self.bias)
            out = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)
        return out.reshape(b, 1, h * d)


def fastest_attention(
    static: StaticDecode,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    repeats: int = 8,
    triton: bool = True,
) -> tuple[str, dict[str, float]]:
    """Time each ATTENTION variant (and the Triton kernel, unless `triton` is off: the
    model's `kernels.decode_attention`) of a fresh bucket on the GPU; (fastest, us per call).

    Each variant is captured as a CUDA graph of `repeats` calls on layer 0 (the bucket's
    rows write their keys to the scratch slot: no request's cache is touched) and replayed;
    the median of 5 replays counts. q (B, H, 1, D), k and v (B, K, 1, D) are stand-ins of
    the model's shapes.
    """

    b, _, _, d = q.shape
    tables = (torch.ones(b, 1, 1, d, dtype=q.dtype, device=q.device),
              torch.zeros(b, 1, 1, d, dtype=q.dtype, device=q.device))  # fmt: skip

    def calls() -> None:  # the Triton variant's time includes the RoPE it takes over
        for _ in range(repeats):
            static.attend(0, q, k, v, rope=tables if static.rope_in_attend else None)

    times: dict[str, float] = {}
    was = static.attention
    variants = ATTENTION + ((TRITON_ATTENTION,) if triton and triton_available() else ())
    for name in variants:
        static.attention = name
        try:
            times[name] = replay_ms(capture_graph(calls)[0]) * 1000 / repeats
        except Exception as e:  # the Triton kernel is a speed choice: time the others
            if name != TRITON_ATTENTION:
                raise
            warnings.warn(f"decode attention kernel failed ({e}); not used", stacklevel=2)
    static.attention = was
    return min(times, key=times.__getitem__), times


@dataclass
class _Entry:
    static: StaticDecode
    logits: torch.Tensor | None = None  # (B, V) float32, the graph's output buffer
    graph: torch.cuda.CUDAGraph | None = None


class DecodeRunner:
    """Decode steps through bucketed static buffers, captured as CUDA graphs if `capture`.

    The pool must hold one slot more than the engine's rows (the scratch slot). Graphs are
    captured on first use of a bucket and kept; a change of adapter columns gives a new key.
    """

    def __init__(self, model: Llama, pool: SlotPool, selection: Selection, max_batch: int,
                 max_len: int, *, capture: bool) -> None:  # fmt: skip
        if capture and pool.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if pool.slots < max_batch + 1:
            raise ValueError("the pool needs a scratch slot past the engine's rows")
        self.model, self.pool, self.selection = model, pool, selection
        self.max_batch, self.max_len, self.capture = max_batch, max_len, capture
        self._entries: dict[tuple[int, int, int], _Entry] = {}
        # (rows, width) -> the attention variant captured buckets run and each one's time (us)
        self.attention: dict[tuple[int, int], tuple[str, dict[str, float]]] = {}
        # (rows, width, cols) of one-row buckets -> ms a replay without / with the fused GEMV
        self.gemv: dict[tuple[int, int, int], dict[str, float]] = {}
        self._pool_handle = torch.cuda.graph_pool_handle() if capture else None
        self.captured = 0  # graphs captured so far (a test and the benchmark read it)
        # decode one step ahead (see launch_ahead): on with graphs; tests switch it on for the
        # static path on CPU
        self.run_ahead = capture
        self.ahead_launched = 0  # steps run ahead
        self.ahead_used = 0  # steps whose logits came from a step run ahead
        self._last: _Entry | None = None
        self._ahead: tuple | None = None  # (entry, starts, lora_slots, host tokens, epoch)

    def logits(self, tokens: list[int | None], starts: list[int],
               lora_slots: list[int | None], epoch: int = 0) -> torch.Tensor:  # fmt: skip
        """Float32 logits (n, V) of the step; rows that feed no token hold garbage. `epoch`
        is the caller's count of batch changes (a step run ahead at another is stale)."""
        n = len(tokens)
        entry = self._entry(*self._key(tokens, starts, lora_slots))
        ahead, self._ahead = self._ahead, None
        self._last = entry
        if (
            ahead is not None
            and ahead[0] is entry
            and ahead[1:3] == (starts, lora_slots)
            and ahead[4] == epoch
            and ahead[3].tolist() == tokens
        ):  # run ahead with exactly these inputs: its logits are (being) computed
            self.ahead_used += 1
            return entry.logits[:n]
        entry.static.fill(tokens, starts, lora_slots, self.selection.max_rank)
        self._run(entry)
        return entry.logits[:n]

    def launch_ahead(self, tokens: torch.Tensor, host_tokens: torch.Tensor, starts: list[int],
                     lora_slots: list[int | None], epoch: int) -> bool:  # fmt: skip
        """Start the next step of the last bucket now, each row fed `tokens` (n,) (on the
        device: this step's greedy tokens) at `starts` (one past this step's positions), so
        the GPU runs it while the host handles this step's tokens (the step's host work
        otherwise leaves the GPU idle: ~0.3 ms of a 5.5 ms batch-1 step on an H200). The
        next `logits` call uses it if its inputs are exactly these (`host_tokens`, the same
        values on the host, read then), at the same `epoch`; anything else (a row finished,
        joined, a sampled token) recomputes, and the keys/values this step wrote at the
        rows' next positions are written again. Returns whether it launched: only for
        buckets whose attention bounds rows by their write positions (no mask to update)
        and whose width still holds the next positions."""
        entry, n = self._last, len(starts)
        if not self.run_ahead or entry is None or n != tokens.shape[0]:
            return False
        st = entry.static
        if st.attention != TRITON_ATTENTION or self._entry_key(entry) != self._key(
            [0] * n, starts, lora_slots
        ):
            return False
        st.ids[:n, 0].copy_(tokens, non_blocking=True)
        st.ints[1::2, :n].add_(1)  # positions and write positions of the live rows
        self._run(entry)
        self.ahead_launched += 1
        self._ahead = (entry, list(starts), list(lora_slots), host_tokens, epoch)
        return True

    def _key(self, tokens: list[int | None], starts: list[int],
             lora_slots: list[int | None]) -> tuple[int, int, int]:  # fmt: skip
        width = max(s + 1 for t, s in zip(tokens, starts, strict=True) if t is not None)
        width = min(-(-width // WIDTH_STEP) * WIDTH_STEP, self.max_len)
        uses_lora = self.selection.cols > 0 and any(s is not None for s in lora_slots)
        cols = self.selection.cols if uses_lora else 0
        return row_bucket(len(tokens), self.max_batch), width, cols

    @staticmethod
    def _entry_key(entry: _Entry) -> tuple[int, int, int]:
        st = entry.static
        return st.rows, st.width, st.cols

    def _run(self, entry: _Entry) -> None:
        if entry.graph is not None:
            entry.graph.replay()
        else:
            entry.logits = self._forward(entry.static)

    def _entry(self, rows: int, width: int, cols: int) -> _Entry:
        key = (rows, width, cols)
        entry = self._entries.get(key)
        if entry is None:
            static = StaticDecode(self.pool, rows, width, cols, self.model.dtype)
            entry = self._entries[key] = _Entry(static)
            if self.capture:
                static.attention = self._attention(static)
                self._capture(entry)
        return entry

    def _attention(self, static: StaticDecode) -> str:
        """The fastest attention variant for the bucket's (rows, width), timed once."""
        key = (static.rows, static.width)
        if key not in self.attention:
            cfg, dev, dt = self.model.cfg, self.pool.device, self.model.dtype
            q = torch.randn(static.rows, cfg.n_heads, 1, cfg.head_dim, device=dev, dtype=dt)
            k = torch.randn(static.rows, cfg.n_kv_heads, 1, cfg.head_dim, device=dev, dtype=dt)
            try:
                self.attention[key] = fastest_attention(
                    static, q, k, torch.randn_like(k), triton=self.model.kernels.decode_attention
                )
            except RuntimeError as e:  # a speed choice only: serve with the rule, say why
                msg = f"timing decode attention failed ({e}); using the default rule"
                warnings.warn(msg, stacklevel=2)
                self.attention[key] = (default_attention(static.rows), {})
        return self.attention[key][0]

    def _forward(self, st: StaticDecode) -> torch.Tensor:
        sel = self.selection
        if st.lora_mask is not None:
            sel.mask = st.lora_mask
        else:
            sel.base_only = True
        sel.gemv = st.gemv
        if st.gemv and st.rows == 1 and st.lora_mask is not None:
            sel.col0 = st.ints[4, :1]  # the one-row kernels read only the row's own slot
        try:
            hidden = self.model.hidden_states(st.ids, positions=st.positions, cache=st)
            return self.model.lm_head(hidden[:, 0]).float()
        finally:
            sel.clear()

    def _capture(self, entry: _Entry) -> None:
        """Capture the bucket's step; a one-row bucket is captured with and without the fused
        GEMV (kernels/gemv.py), both replays timed, and the faster graph kept."""
        st = entry.static
        timed = st.rows == 1 and triton_available() and self.model.kernels.gemv
        tries: list[tuple[float, bool, torch.cuda.CUDAGraph, torch.Tensor]] = []
        for gemv in (False, True) if timed else (False,):
            st.gemv = gemv
            try:
                graph, logits = self._capture_once(st)
            except Exception as e:  # the fused path (Triton) is a speed choice: keep cuBLAS
                if not gemv:
                    raise
                warnings.warn(f"fused one-row GEMV failed ({e}); decoding without it", stacklevel=2)
                continue
            ms = replay_ms(graph, replays=10, warmups=3) if timed else 0.0
            tries.append((ms, gemv, graph, logits))
        _, st.gemv, entry.graph, entry.logits = min(tries, key=lambda t: t[0])
        if len(tries) > 1:
            self.gemv[(st.rows, st.width, st.cols)] = {
                ("fused" if t[1] else "cublas"): round(t[0], 3) for t in tries
            }
        self.captured += 1

    def _capture_once(self, st: StaticDecode) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Two warm-up steps on a side stream (scratch writes only), then the capture."""
        return capture_graph(lambda: self._forward(st), warmups=2, pool=self._pool_handle)
