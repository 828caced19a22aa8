"""Text generators for data synthesis: a local model on the engine, or an OpenAI endpoint.

Both take a list of prompts and return one `Completion` per prompt (text and finish reason);
`chat` sends each prompt as one user message (the model's chat template, or the endpoint's
`/chat/completions`), otherwise as raw text (`/completions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import UserError


@dataclass(frozen=True)
class Completion:
    """One generated text and why it ended ("stop" or "length")."""

    text: str
    finish_reason: str


@dataclass(frozen=True)
class GenParams:
    """Sampling settings shared by a call; `seeds` (one per prompt) make runs repeatable."""

    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    seeds: Sequence[int] | None = None
    stop: Sequence[str] = field(default_factory=tuple)


class Generator(Protocol):
    """Anything that completes a batch of prompts."""

    name: str

    def complete(self, prompts: Sequence[str], params: GenParams) -> list[Completion]:
        """One completion per prompt, in order."""
        ...


def _seed(params: GenParams, i: int) -> int | None:
    return None if params.seeds is None else int(params.seeds[i])


class LocalGenerator:
    """A loaded llamaforge model (optionally one LoRA adapter) on the batching engine."""

    def __init__(
        self, model, tok, *, chat: bool, template: str = "auto", max_batch: int = 16
    ) -> None:
        self.model, self.tok, self.chat, self.template = model, tok, chat, template
        self.max_batch = max_batch
        self.adapter: str | None = None
        self.name = "local model"

    @classmethod
    def load(cls, model: str, *, adapter: str | None = None, device=None, dtype=None, **kw):
        """Load MODEL (+ a PEFT adapter folder) as a generator."""
        from pathlib import Path

        from ..io.load import load_model
        from ..io.peft import load_peft_adapter

        if adapter is not None and not Path(adapter).is_dir():
            raise UserError(f"--adapter {adapter}: no such adapter folder")
        net, tok = load_model(model, device=device, dtype=dtype)
        gen = cls(net, tok, **kw)
        gen.name = f"{model}" + (f" + {adapter}" if adapter else "")
        if adapter is not None:
            load_peft_adapter(net, adapter, adapter_name="adapter", activate=False)
            gen.adapter = "adapter"
        return gen

    def encode(self, prompt: str) -> list[int]:
        """Prompt ids: the chat template around one user message, or the raw text."""
        from ..data.templates import render_conversation

        if self.chat:
            msgs = [{"role": "user", "content": prompt}]
            return render_conversation(self.tok, msgs, self.template, add_generation_prompt=True)[0]
        tok = self.tok
        return tok.encode(prompt, bos=tok.bos_id is not None and tok.add_bos)

    def complete(self, prompts: Sequence[str], params: GenParams) -> list[Completion]:
        """Sample every prompt in one continuous batch (KV cache, per-row seeds)."""
        from ..model.generate import SamplingParams
        from ..serve.engine import LENGTH, OFFLINE_PREFILL_BUDGET, Engine, Request

        ids = [self.encode(p) for p in prompts]
        max_len = min(max(map(len, ids)) + params.max_tokens + 1, self.model.cfg.max_seq_len)
        if max(map(len, ids)) >= max_len:
            raise UserError(f"a prompt of {max(map(len, ids))} tokens fills the model's context")
        engine = Engine(
            self.model,
            decode=self.tok.decode,
            max_batch=min(self.max_batch, len(ids)),
            max_len=max_len,
            prefill_budget=OFFLINE_PREFILL_BUDGET,
        )
        reqs = []
        for i, p in enumerate(ids):
            sp = SamplingParams(
                max_new_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stop_ids=sorted(self.tok.stop_ids),
                stop_strings=list(params.stop),
                seed=_seed(params, i),
            )
            reqs.append(engine.submit(Request(p, sp, self.adapter), enforce_queue_cap=False))
        engine.wait(reqs)
        out = []
        for r in reqs:
            if r.error:
                raise RuntimeError(f"generation failed: {r.error}")
            reason = "length" if r.finish_reason == LENGTH else "stop"
            out.append(Completion(self.tok.decode(r.output), reason))
        return out


class EndpointGenerator:
    """Any OpenAI-compatible server (`llamaforge serve`, vLLM, a hosted API) via `openai`."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        chat: bool = False,
        concurrency: int = 8,
        timeout: float = 600.0,
    ) -> None:
        try:
            import openai
        except ImportError:
            raise UserError(
                "--endpoint needs the openai package: pip install openai (requirements/test.txt)"
            ) from None
        self.openai = openai
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "none", timeout=timeout, max_retries=2
        )
        self.url, self.model, self.chat, self.concurrency = base_url, model, chat, concurrency
        self.name = f"{model} at {base_url}"

    def _one(self, prompt: str, params: GenParams, seed: int | None) -> Completion:
        kw: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if seed is not None:
            kw["seed"] = seed
        if params.stop:
            kw["stop"] = list(params.stop)[:4]
        try:
            if self.chat:
                msgs = [{"role": "user", "content": prompt}]
                r = self.client.chat.completions.create(messages=msgs, **kw)
                text = r.choices[0].message.content or ""
            else:
                r = self.client.completions.create(prompt=prompt, **kw)
                text = r.choices[0].text
        except self.openai.APIStatusError as e:
            detail = f"{e.message} ({e.response.request.method} {e.response.request.url})"
            raise UserError(f"--endpoint {self.url}: HTTP {e.status_code}: {detail}") from None
        except self.openai.APIConnectionError as e:
            raise UserError(f"--endpoint {self.url}: cannot connect ({e})") from None
        reason = "length" if r.choices[0].finish_reason == "length" else "stop"
        return Completion(text, reason)

    def complete(self, prompts: Sequence[str], params: GenParams) -> list[Completion]:
        """Send the prompts concurrently (the server batches them); results in order."""
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(prompts)))) as ex:
            futures = [
                ex.submit(self._one, p, params, _seed(params, i)) for i, p in enumerate(prompts)
            ]
            return [f.result() for f in futures]
