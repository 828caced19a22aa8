"""The generation engine: continuous batching over one base model and many LoRA adapters.

Requests are submitted at any time (thread-safe) and join the running batch between decode
steps; a finished or cancelled request leaves it at once and its slot is reused. Every row
has its own sampling parameters (`SamplingParams`: temperature, top-k, top-p, repetition
penalty, max tokens, stop ids and strings, seed) and its own adapter or none: the base matmul
runs once for the batch and each row's LoRA delta comes from gathered adapter weights
(`lora_stack`). Keys/values live in a slot pool with per-row lengths (`kv`).

One engine step: (1) drop cancelled rows, admit queued requests into free slots (at most
`max_batch` rows; the queue holds at most `max_queue`); (2) prefill: each row still reading
its prompt gets its next chunk of at most `prefill_chunk` tokens, as many rows as fit in
`prefill_budget` tokens (one forward); a row whose prompt is done samples its first token;
(3) decode: every row with a sampled token feeds it (one forward of one token per row) and
samples the next. A long prompt therefore costs running rows at most one chunk's forward per
step instead of stalling them for the whole prompt. A row's prompt is always cut into the
same chunks, whatever else runs, so its arithmetic does not depend on the batch.

Use it synchronously (`generate`, which runs steps in the calling thread) or start its
background thread (`start`) and `submit` from any thread, as the HTTP server does.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..adapters.lora import adapter_names, lora_modules
from ..model.generate import Decode, SamplingParams, _cut_at_stop_string
from ..model.llama import Llama
from ..runtime import frozen_gc
from .fused_proj import fuse_projections as fuse_projections_of
from .graphs import DecodeRunner
from .kv import RowBatch, SlotPool
from .lora_stack import AdapterStacks
from .sampling import RowSampling, logprob_info, sample_rows

log = logging.getLogger(__name__)

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_ids = itertools.count()
# decode step: "cuda" replays CUDA graphs of bucketed static buffers, "static" runs those
# buffers eagerly (how the CPU tests check that path), "off" the plain per-step path;
# "auto" is "cuda" on a GPU, else "off"
GRAPH_MODES = ("auto", "cuda", "static", "off")
# prefill budget (tokens per forward) for offline callers (generate, rollouts, sampling):
# nobody waits for a running row's next token, so a whole batch of prompts prefills in one
# forward instead of one prompt per step (which costs a forward's launches per prompt)
OFFLINE_PREFILL_BUDGET = 16384


class EngineBusy(RuntimeError):
    """The queue is full: the caller should retry later."""


class UnknownAdapter(KeyError):
    """A request named an adapter the engine does not hold."""


class Request:
    """One generation: its prompt, settings, progress and result.

    on_token(request, token) is called from the engine thread for each new token (never a
    stop id; tokens later cut by a stop string have been passed too, see TextStream);
    on_finish(request) once at the end. `finish_reason` is stop, length, cancelled or error.
    """

    def __init__(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        adapter: str | None = None,
        *,
        logprobs: int | None = None,
        on_token: Callable[[Request, int], None] | None = None,
        on_finish: Callable[[Request], None] | None = None,
    ) -> None:
        self.id = next(_ids)
        self.prompt = [int(t) for t in prompt]
        self.params, self.adapter, self.logprobs = params, adapter, logprobs
        self.on_token, self.on_finish = on_token, on_finish
        self.output: list[int] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.done = threading.Event()
        self.cancelled = False
        self.stop_ids = frozenset(int(t) for t in params.stop_ids)
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)
        self.sampling = RowSampling(
            params.temperature,
            params.top_k,
            params.top_p,
            params.repetition_penalty,
            self.generator,
        )
        self.seen: torch.Tensor | None = None  # (V,) bool, with a repetition penalty
        self.slot: int | None = None
        self.cached = 0  # tokens whose keys/values are in the pool
        self.pending: int | None = None  # sampled token not yet fed to the model
        self.times: list[float] = []  # perf_counter at submit, then at every token
        self.finished_at: float | None = None

    @property
    def reading_prompt(self) -> bool:
        """Whether part of the prompt is still to be prefilled."""
        return self.cached < len(self.prompt)

    @property
    def ttft(self) -> float | None:
        """Seconds from submit to the first token."""
        return self.times[1] - self.times[0] if len(self.times) > 1 else None


class Engine:
    """Continuous-batching generation over `model` (see the module docstring)."""

    def __init__(
        self,
        model: Llama,
        *,
        decode: Decode | None = None,
        max_batch: int = 16,
        max_len: int | None = None,
        prefill_chunk: int = 256,
        prefill_budget: int | None = None,
        max_queue: int = 1024,
        max_loras: int | None = None,
        max_lora_rank: int | None = None,
        graphs: str = "auto",
        fuse_projections: bool = False,
    ) -> None:
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1")
        if graphs not in GRAPH_MODES:
            raise ValueError(f"graphs={graphs!r}: choose one of {', '.join(GRAPH_MODES)}")
        self.model = model  # not switched to eval: the decoder has no dropout, and a
        # training caller (rollouts) keeps its mode; engine forwards run under inference_mode
        self.decode = decode
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = max_len or model.cfg.max_seq_len
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = max(prefill_budget or prefill_chunk, prefill_chunk)
        dev, dt = model.device, model.dtype
        # one slot more than rows: the static decode path's scratch slot (graphs.py)
        self.pool = SlotPool(model.cfg, max_batch + 1, self.max_len, dtype=dt, device=dev)
        existing = adapter_names(model)
        ranks = [r for _, m in lora_modules(model) for r in m.rank.values()]
        if max_loras is None:
            max_loras = len(existing)
        if max_lora_rank is None:
            max_lora_rank = max(ranks, default=16)
        self.stacks = AdapterStacks(model, max_loras, max_lora_rank, dt)
        for name in existing:
            self.stacks.add(name)
        # q/k/v and gate/up as one matmul each (serve/fused_proj.py); views of the weights,
        # so only for callers that do not save the model's tensors afterwards
        self.fused_groups = (
            fuse_projections_of(model, self.stacks.selection) if fuse_projections else 0
        )
        if graphs == "auto":
            graphs = "cuda" if dev.type == "cuda" else "off"
        self.runner = None
        if graphs != "off":
            self.runner = DecodeRunner(
                model, self.pool, self.stacks.selection, max_batch, self.max_len,
                capture=graphs == "cuda",
            )  # fmt: skip
        self._lock = threading.Condition()
        self._step_lock = threading.RLock()
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []  # index = slot
        self._cancels = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.finished: Counter[str] = Counter()  # requests per finish reason
        self._epoch = 0  # batch changes (joins, releases, adapters): a step run ahead is stale

    # ------------------------------------------------------------------ adapters

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters a request can use."""
        return list(self.stacks.slots)

    def load_adapter(self, name: str, adapter_dir: str | Path) -> None:
        """Load a PEFT adapter folder as `name` between steps (checks in io.peft)."""
        from ..io.peft import load_peft_adapter

        with self._step_lock:
            if name in self.stacks.slots:
                raise ValueError(f"adapter {name!r} is already loaded")
            if len(self.stacks.slots) >= self.stacks.selection.max_loras:
                raise ValueError(
                    f"all {self.stacks.selection.max_loras} adapter slots are in use (--max-loras)"
                )
            self._epoch += 1
            load_peft_adapter(self.model, adapter_dir, adapter_name=name, activate=False)
            try:
                self.stacks.add(name)
            except ValueError:
                self._drop_from_layers(name)
                raise

    def unload_adapter(self, name: str) -> None:
        """Free adapter `name`; refused while a queued or running request uses it."""
        with self._step_lock, self._lock:
            if name not in self.stacks.slots:
                raise UnknownAdapter(name)
            if any(r.adapter == name for r in [*self._waiting, *self._active]):
                raise ValueError(f"adapter {name!r} is in use by running requests")
            self._epoch += 1
            self.stacks.remove(name)
            self._drop_from_layers(name)

    def _drop_from_layers(self, name: str) -> None:
        for _, m in lora_modules(self.model):
            if name in m.lora_A:
                m.remove_adapter(name)

    def refresh_adapter(self, name: str) -> None:
        """Re-read adapter `name` from the model's LoRA layers (e.g. after a training step)."""
        with self._step_lock:
            self._epoch += 1
            self.stacks.refresh(name)

    # ------------------------------------------------------------------ requests

    def submit(self, request: Request, *, enforce_queue_cap: bool = True) -> Request:
        """Queue a request; it runs as soon as a slot is free. Thread-safe."""
        n = len(request.prompt)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_len:
            raise ValueError(f"prompt of {n} tokens does not fit max_len {self.max_len}")
        if request.adapter is not None and request.adapter not in self.stacks.slots:
            raise UnknownAdapter(request.adapter)
        if request.params.stop_strings and self.decode is None:
            raise ValueError("stop strings need an engine with a decode function")
        request.times = [time.perf_counter()]
        with self._lock:
            if enforce_queue_cap and len(self._waiting) >= self.max_queue:
                raise EngineBusy(f"{len(self._waiting)} requests are queued; try again later")
            if request.params.max_new_tokens == 0:
                self._finish(request, LENGTH)
                return request
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request; its row is freed before the next step. Thread-safe."""
        with self._lock:
            if request.finish_reason is None and not request.cancelled:
                request.cancelled = True
                self._cancels += 1
                self._lock.notify_all()

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        adapters: Sequence[str | None] | None = None,
        *,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[list[int]]:
        """New tokens per prompt (like model.generate.generate), each row its own adapter."""
        many = params if isinstance(params, Sequence) else [params] * len(prompts)
        names = adapters if adapters is not None else [None] * len(prompts)
        if len(many) != len(prompts) or len(names) != len(prompts):
            raise ValueError("one SamplingParams and one adapter per prompt")
        reqs = []
        for i, (p, sp, name) in enumerate(zip(prompts, many, names, strict=True)):
            cb = None if on_token is None else (lambda _r, t, i=i: on_token(i, t))
            reqs.append(self.submit(Request(p, sp, name, on_token=cb), enforce_queue_cap=False))
        self.wait(reqs)
        failed = [r.error for r in reqs if r.finish_reason == ERROR]
        if failed:
            raise RuntimeError(f"generation failed: {failed[0]}")
        return [r.output for r in reqs]

    def wait(self, requests: Sequence[Request]) -> None:
        """Block until every request has finished (running steps here without a thread)."""
        if self._thread is not None:
            for r in requests:
                r.done.wait()
            return
        while not all(r.done.is_set() for r in requests):
            self.step()

    # ------------------------------------------------------------------ background thread

    def start(self) -> Engine:
        """Run steps in a background thread until `stop`."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(
                target=self._loop, name="llamaforge-engine", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread; unfinished requests are cancelled."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for r in [*self._waiting, *self._active]:
            self._finish(r, CANCELLED)
        self._waiting.clear()
        self._active.clear()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._active or self._cancels)

    def _loop(self) -> None:
        with frozen_gc():  # no collector pass over the model's objects between tokens
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._has_work():
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a failed step fails its requests, not the server
                log.exception("engine step failed")
                self._fail_running(f"{type(e).__name__}: {e}")

    def _fail_running(self, message: str) -> None:
        with self._step_lock:
            for r in list(self._active):
                r.error = message
                self._finish(r, ERROR)
            self._active.clear()

    @property
    def load(self) -> dict[str, int]:
        """Rows running and requests queued."""
        return {"running": len(self._active), "queued": len(self._waiting)}

    # ------------------------------------------------------------------ one step

    def step(self) -> None:
        """One scheduler iteration: cancel, admit, prefill one chunk round, decode one token."""
        with self._step_lock, torch.inference_mode(), sdpa_kernel(_BACKENDS):
            self._cancel_and_admit()
            if not self._active:
                return
            self._prefill()
            self._release_finished()
            self._decode()
            self._release_finished()
            self.steps += 1

    def _cancel_and_admit(self) -> None:
        with self._lock:
            if self._cancels:
                self._cancels = 0
                for r in [r for r in self._waiting if r.cancelled]:
                    self._waiting.remove(r)
                    self._finish(r, CANCELLED)
                for r in self._active:
                    if r.cancelled:
                        self._finish(r, CANCELLED)
                self._release_finished()
            while self._waiting and len(self._active) < self.max_batch:
                self._epoch += 1
                r = self._waiting.popleft()
                r.slot = len(self._active)
                self._active.append(r)
                if r.params.repetition_penalty != 1.0:
                    r.seen = torch.zeros(self.model.cfg.vocab_size, dtype=torch.bool)
                    r.seen[torch.tensor(r.prompt)] = True
                    r.seen = r.seen.to(self.model.device)

    def _forward(
        self, rows: list[Request], tokens: list[list[int]], n_new: list[int]
    ) -> torch.Tensor:
        """Hidden states (B, T, C) of new tokens for rows of the pool, each with its adapter."""
        dev = self.model.device
        t = max(n_new)
        ids = torch.tensor([toks + [0] * (t - len(toks)) for toks in tokens], device=dev)
        batch = RowBatch(self.pool, [r.slot for r in rows], [r.cached for r in rows], n_new)
        slots = [None if r.adapter is None else self.stacks.slots[r.adapter] for r in rows]
        sel = self.stacks.selection
        sel.set_rows(slots, self.model.dtype, dev)
        try:
            return self.model.hidden_states(ids, positions=batch.positions, cache=batch)
        finally:
            sel.clear()

    def _prefill(self) -> None:
        todo = sorted((r for r in self._active if r.reading_prompt), key=lambda r: r.id)
        chosen, used = [], 0
        for r in todo:
            c = min(len(r.prompt) - r.cached, self.prefill_chunk)
            if chosen and used + c > self.prefill_budget:
                break
            chosen.append((r, c))
            used += c
        if not chosen:
            return
        rows = [r for r, _ in chosen]
        n_new = [c for _, c in chosen]
        hidden = self._forward(rows, [r.prompt[r.cached : r.cached + c] for r, c in chosen], n_new)
        ready = []
        for b, (r, c) in enumerate(chosen):
            r.cached += c
            if not r.reading_prompt:
                ready.append((b, c - 1))
        if ready:
            b_idx = torch.tensor([b for b, _ in ready], device=hidden.device)
            t_idx = torch.tensor([t for _, t in ready], device=hidden.device)
            logits = self.model.lm_head(hidden[b_idx, t_idx]).float()  # (R, V)
            self._sample_and_accept([rows[b] for b, _ in ready], logits)

    def _decode(self) -> None:
        rows = list(self._active)  # slots 0..n-1, in order
        live = [i for i, r in enumerate(rows) if r.pending is not None]
        if not live:
            return
        ahead = None
        if self.runner is not None:  # bucketed static buffers (CUDA graphs on a GPU)
            slots = [None if r.adapter is None else self.stacks.slots[r.adapter] for r in rows]
            tokens = [r.pending for r in rows]
            logits = self.runner.logits(tokens, [r.cached for r in rows], slots, self._epoch)
            if len(live) == len(rows) and self._can_run_ahead(rows):
                nxt, runner, epoch = [r.cached + 1 for r in rows], self.runner, self._epoch
                ahead = lambda dev, host: runner.launch_ahead(dev, host, nxt, slots, epoch)  # noqa: E731
            if len(live) < len(rows):
                logits = logits.index_select(0, torch.tensor(live, device=logits.device))
        else:
            tokens = [[r.pending if r.pending is not None else 0] for r in rows]
            n_new = [1 if r.pending is not None else 0 for r in rows]
            hidden = self._forward(rows, tokens, n_new)  # (B, 1, C)
            if len(live) < len(rows):
                hidden = hidden.index_select(0, torch.tensor(live, device=hidden.device))
            logits = self.model.lm_head(hidden[:, 0]).float()
        fed = [rows[i] for i in live]
        for r in fed:
            r.cached += 1
            r.pending = None
        self._sample_and_accept(fed, logits, ahead)

    def _can_run_ahead(self, rows: list[Request]) -> bool:
        """Whether every row will greedily take one more token after this step whatever it
        is, so the next step can start before the host sees this one's (a stop token, a
        stop string or a join still can end it: the runner then recomputes)."""
        if self._waiting or self._cancels:
            return False
        return all(
            r.sampling.temperature <= 0
            and r.seen is None
            and r.logprobs is None
            and not r.cancelled
            and len(r.output) + 1 < r.params.max_new_tokens
            and r.cached + 1 < self.max_len
            for r in rows
        )

    def _sample_and_accept(self, rows: list[Request], logits: torch.Tensor,
                           ahead: Callable | None = None) -> None:  # fmt: skip
        seen = None
        if any(r.seen is not None for r in rows):
            blank = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            seen = torch.stack([r.seen if r.seen is not None else blank for r in rows])
        tokens = sample_rows(logits, [r.sampling for r in rows], seen)
        want = [r.logprobs for r in rows if r.logprobs is not None]
        lps = tops = None
        if want:
            lps, tops = logprob_info(logits, tokens, max(want))
        if ahead is not None and lps is None:  # start the next step, then read the tokens
            host = tokens.to("cpu", non_blocking=True)
            copied = torch.cuda.Event() if tokens.is_cuda else None
            if copied is not None:
                copied.record()
            ahead(tokens, host)
            if copied is not None:
                copied.synchronize()  # this step's tokens only, not the step run ahead
        else:
            host = tokens.cpu()
        now = time.perf_counter()
        for i, (r, t) in enumerate(zip(rows, host.tolist(), strict=True)):
            if r.cancelled:
                self._finish(r, CANCELLED)
                continue
            r.times.append(now)
            if lps is not None and r.logprobs is not None:
                self._accept(r, t, lps[i], tops[i][: r.logprobs])
            else:
                self._accept(r, t, None, None)

    def _accept(self, r: Request, token: int, lp: float | None, top) -> None:
        if token in r.stop_ids:
            self._finish(r, STOP)
            return
        r.output.append(token)
        if lp is not None:
            r.token_logprobs.append(lp)
            r.top_logprobs.append(top)
        if r.seen is not None:
            r.seen[token] = True
        if r.on_token is not None:
            r.on_token(r, token)
        if r.params.stop_strings:
            cut = _cut_at_stop_string(r.output, self.decode, r.params.stop_strings)
            if cut is not None:
                del r.output[cut:], r.token_logprobs[cut:], r.top_logprobs[cut:]
                self._finish(r, STOP)
                return
        if len(r.output) >= r.params.max_new_tokens or r.cached >= self.max_len:
            self._finish(r, LENGTH)
            return
        r.pending = token

    def _finish(self, r: Request, reason: str) -> None:
        if r.finish_reason is not None:
            return
        r.finish_reason, r.pending = reason, None
        r.finished_at = time.perf_counter()
        self.finished[reason] += 1
        if r.on_finish is not None:
            try:
                r.on_finish(r)
            except Exception:  # a listener's failure must not break the batch
                log.exception("on_finish callback failed")
        r.done.set()

    def _release_finished(self) -> None:
        """Free the slots of finished rows, moving the last rows into the holes."""
        gone = sorted((i for i, r in enumerate(self._active) if r.finish_reason), reverse=True)
        if gone:
            self._epoch += 1
        for s in gone:
            last = len(self._active) - 1
            if s != last:
                moved = self._active[last]
                self.pool.move(last, s, moved.cached)
                self._active[s], moved.slot = moved, s
            self._active.pop()
