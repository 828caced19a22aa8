"""An OpenAI-compatible HTTP API over the engine (FastAPI on uvicorn).

Routes: `GET /health`, `GET /v1/models` (the base and each adapter, with `parent`),
`POST /v1/chat/completions` (the model's chat template), `POST /v1/completions` (plain
prompts), and, only with `admin=True` and an API key, `POST /v1/admin/adapters {"name"}` /
`DELETE /v1/admin/adapters/{name}` to load or unload an adapter of the adapter root by name.
The request's `model` names the base or an adapter; it is only ever looked up in that list.

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for bad
input (malformed JSON included), 401 for a missing or wrong key, 404 for an unknown model,
503 when the queue is full, 500 (no traceback) for a bug. A client that disconnects has its
requests cancelled, which frees their rows before the next engine step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data.templates import render_conversation
from ..errors import UserError
from ..model.generate import SamplingParams, TextStream
from .adapters import check_adapter_dir, check_name, resolve_in_root
from .engine import CANCELLED, ERROR, Engine, EngineBusy, Request, UnknownAdapter

log = logging.getLogger(__name__)


@dataclass
class Limits:
    """What one request may ask for."""

    max_prompt_tokens: int | None = None  # default: the engine's max_len - 1
    max_tokens: int = 4096  # cap on max_tokens per choice
    default_max_tokens: int = 512  # when the request gives none (cut to what fits)
    max_n: int = 8
    max_stop: int = 4
    max_stop_chars: int = 256
    max_top_logprobs: int = 20
    max_legacy_logprobs: int = 5
    max_body_bytes: int = 4 * 1024 * 1024


@dataclass
class ServerSettings:
    """How the app presents the engine."""

    model_id: str
    api_key: str | None = None
    template: str = "auto"
    adapter_root: Path | None = None
    admin: bool = False
    limits: Limits | None = None


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        """The JSON error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        """The HTTP response."""
        return JSONResponse(self.body(), status_code=self.status)


# ----------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # extension (as vLLM): 0 = off
    repetition_penalty: float = Field(default=1.0, gt=0)  # extension
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# ----------------------------------------------------------------------------- the app


def create_app(engine: Engine, tokenizer, settings: ServerSettings) -> FastAPI:
    """The ASGI app; it starts the engine's thread on startup and stops it on shutdown."""
    limits = settings.limits or Limits()
    max_prompt = min(limits.max_prompt_tokens or engine.max_len - 1, engine.max_len - 1)
    server = _Server(engine, tokenizer, settings, limits, max_prompt)

    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="llamaforge", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_req, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(Exception)
    async def _bug(_req, exc: Exception):
        log.exception("internal error")
        return APIError(500, "internal server error", "server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.load}

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        server.auth(request)
        return server.models()

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        server.auth(request)
        body = server.parse(ChatBody, await server.json(request))
        return await server.chat(request, body)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        server.auth(request)
        body = server.parse(CompletionBody, await server.json(request))
        return await server.completions(request, body)

    @app.post("/v1/admin/adapters")
    async def load_adapter(request: HTTPRequest):
        server.admin_auth(request)
        data = await server.json(request)
        name = data.get("name") if isinstance(data, dict) else None
        return await server.load_adapter(name)

    @app.delete("/v1/admin/adapters/{name}")
    async def unload_adapter(name: str, request: HTTPRequest):
        server.admin_auth(request)
        return await server.unload_adapter(name)

    return app


class _Server:
    """The route logic, kept apart from the routing."""

    def __init__(self, engine: Engine, tok, settings: ServerSettings, limits: Limits, max_prompt):
        self.engine, self.tok, self.settings, self.limits = engine, tok, settings, limits
        self.max_prompt = max_prompt
        self.created = int(time.time())

    # -------------------------------------------------------------- plumbing

    def auth(self, request: HTTPRequest) -> None:
        key = self.settings.api_key
        if key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(
                401, "invalid or missing API key", "invalid_request_error", None, "invalid_api_key"
            )

    def admin_auth(self, request: HTTPRequest) -> None:
        if not self.settings.admin or self.settings.api_key is None:
            raise APIError(404, "Not Found", "not_found_error")
        self.auth(request)

    async def json(self, request: HTTPRequest) -> Any:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.limits.max_body_bytes:
            raise APIError(413, f"request body over {self.limits.max_body_bytes} bytes")
        raw = await request.body()
        if len(raw) > self.limits.max_body_bytes:
            raise APIError(413, f"request body over {self.limits.max_body_bytes} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON in the request body: {e}") from None

    @staticmethod
    def parse(model: type[BaseModel], data: Any):
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err["loc"]) or None
            raise APIError(400, f"{param}: {err['msg']}", param=param) from None

    def models(self) -> dict[str, Any]:
        base = self.settings.model_id
        cards = [
            {
                "id": base,
                "object": "model",
                "created": self.created,
                "owned_by": "llamaforge",
                "root": base,
                "parent": None,
            }
        ]
        for name in self.engine.adapters:
            cards.append(
                {
                    "id": name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "llamaforge",
                    "root": base,
                    "parent": base,
                }
            )
        return {"object": "list", "data": cards}

    def adapter_for(self, model: str) -> str | None:
        if model == self.settings.model_id:
            return None
        if model in self.engine.adapters:
            return model
        shown = model if len(model) <= 80 else model[:77] + "..."
        raise APIError(
            404,
            f"The model `{shown}` does not exist.",
            "invalid_request_error",
            "model",
            "model_not_found",
        )

    # -------------------------------------------------------------- requests

    def sampling(
        self, body: _Sampling, max_tokens: int | None, prompt_len: int, where: str = "messages"
    ) -> SamplingParams:
        lim = self.limits
        if body.frequency_penalty or body.presence_penalty:
            raise APIError(
                400,
                "frequency_penalty / presence_penalty are not supported (use repetition_penalty)",
                param="frequency_penalty",
            )
        if body.n > lim.max_n:
            raise APIError(400, f"n must be at most {lim.max_n}", param="n")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > lim.max_stop:
            raise APIError(400, f"at most {lim.max_stop} stop sequences", param="stop")
        if any(not s or len(s) > lim.max_stop_chars for s in stops):
            raise APIError(
                400, f"stop sequences must have 1-{lim.max_stop_chars} characters", param="stop"
            )
        if prompt_len > self.max_prompt:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens; at most {self.max_prompt} are allowed",
                param=where,
                code="context_length_exceeded",
            )
        room = self.engine.max_len - prompt_len
        if max_tokens is None:
            max_tokens = min(lim.default_max_tokens, room)
        elif max_tokens > lim.max_tokens:
            raise APIError(400, f"max_tokens must be at most {lim.max_tokens}", param="max_tokens")
        elif max_tokens > room:
            raise APIError(
                400,
                f"max_tokens {max_tokens} + the prompt's {prompt_len} tokens "
                f"exceed the context of {self.engine.max_len}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            stop_ids=sorted(self.tok.stop_ids),
            stop_strings=stops,
            seed=body.seed,
        )

    def chat_prompt(self, body: ChatBody) -> list[int]:
        msgs = []
        for m in body.messages:
            if isinstance(m.content, list):
                if any(p.type != "text" or p.text is None for p in m.content):
                    raise APIError(400, "only text content parts are supported", param="messages")
                text = "".join(p.text for p in m.content)
            else:
                text = m.content or ""
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        try:
            ids, _ = render_conversation(
                self.tok, msgs, self.settings.template, add_generation_prompt=True
            )
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        return ids

    def completion_prompts(self, body: CompletionBody) -> list[list[int]]:
        if body.echo or body.suffix is not None or (body.best_of or body.n) != body.n:
            raise APIError(400, "echo, suffix and best_of are not supported", param="echo")
        p = body.prompt
        vocab = self.tok.vocab_size
        if isinstance(p, str):
            texts: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            texts = [p]
        else:
            texts = list(p)
        if not texts or len(texts) > self.limits.max_n:
            raise APIError(400, f"give 1-{self.limits.max_n} prompts", param="prompt")
        out = []
        for t in texts:
            if isinstance(t, str):
                out.append(self.tok.encode(t, bos=self.tok.bos_id is not None and self.tok.add_bos))
            elif any(not 0 <= i < vocab for i in t):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
            else:
                out.append(list(t))
        if any(not ids for ids in out):
            raise APIError(400, "a prompt is empty", param="prompt")
        return out

    def submit(self, prompt, params, adapter, logprobs, n, listener) -> list[Request]:
        reqs = []
        try:
            for i in range(n):
                sp = params
                if n > 1 and params.seed is not None:
                    sp = SamplingParams(**{**params.__dict__, "seed": params.seed + i})
                on_token, on_finish = listener(len(reqs))
                r = Request(
                    prompt, sp, adapter, logprobs=logprobs, on_token=on_token, on_finish=on_finish
                )
                reqs.append(self.engine.submit(r))
        except EngineBusy as e:
            for r in reqs:
                self.engine.cancel(r)
            raise APIError(503, str(e), "server_error", None, "overloaded") from None
        except UnknownAdapter:
            for r in reqs:
                self.engine.cancel(r)
            raise APIError(
                404, "the adapter was unloaded", param="model", code="model_not_found"
            ) from None
        return reqs

    async def run(
        self,
        request: HTTPRequest,
        prompts: list[list[int]],
        params: list[SamplingParams],
        adapter: str | None,
        logprobs: int | None,
        n: int,
        stream: bool,
    ):
        """Submit every (prompt, choice); stream events or wait for all of them."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        reqs: list[Request] = []

        def listener_for(base: int):
            def listener(j: int):
                idx = base + j

                def on_token(r: Request, token: int) -> None:
                    lp = r.token_logprobs[-1] if r.logprobs is not None else None
                    top = r.top_logprobs[-1] if r.logprobs is not None else None
                    loop.call_soon_threadsafe(queue.put_nowait, (idx, token, lp, top))

                def on_finish(r: Request) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, (idx, None, None, None))

                return on_token, on_finish

            return listener

        try:
            for k, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
                reqs += self.submit(prompt, sp, adapter, logprobs, n, listener_for(k * n))
        except BaseException:
            for r in reqs:
                self.engine.cancel(r)
            raise
        if stream:
            return reqs, queue
        try:
            remaining = len(reqs)
            while remaining:
                try:
                    idx, token, _, _ = await asyncio.wait_for(queue.get(), timeout=0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                if token is None:
                    remaining -= 1
        except BaseException:
            for r in reqs:
                self.engine.cancel(r)
            raise
        failed = [r for r in reqs if r.finish_reason in (ERROR, CANCELLED)]
        if failed:
            raise APIError(500, "generation failed", "server_error")
        return reqs, None

    def usage(self, prompts: list[list[int]], reqs: list[Request]) -> dict[str, int]:
        p = sum(len(x) for x in prompts)
        c = sum(len(r.output) for r in reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def token_text(self, token: int) -> str:
        return self.tok.decode([token], skip_special=False)

    def chat_logprobs(self, tokens, lps, tops) -> dict[str, Any]:
        content = []
        for t, lp, top in zip(tokens, lps, tops, strict=False):
            s = self.token_text(t)
            content.append(
                {
                    "token": s,
                    "logprob": lp,
                    "bytes": list(s.encode()),
                    "top_logprobs": [
                        {
                            "token": (ts := self.token_text(i)),
                            "logprob": v,
                            "bytes": list(ts.encode()),
                        }
                        for i, v in top
                    ],
                }
            )
        return {"content": content, "refusal": None}

    def legacy_logprobs(self, tokens, lps, tops, offset: int = 0) -> dict[str, Any]:
        strs = [self.token_text(t) for t in tokens]
        offsets, pos = [], offset
        for s in strs:
            offsets.append(pos)
            pos += len(s)
        return {
            "tokens": strs,
            "token_logprobs": list(lps),
            "top_logprobs": [{self.token_text(i): v for i, v in top} for top in tops],
            "text_offset": offsets,
        }

    # -------------------------------------------------------------- endpoints

    async def chat(self, request: HTTPRequest, body: ChatBody):
        adapter = self.adapter_for(body.model)
        prompt = self.chat_prompt(body)
        max_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
        params = self.sampling(body, max_tokens, len(prompt))
        top = body.top_logprobs or 0
        if top > self.limits.max_top_logprobs:
            raise APIError(
                400,
                f"top_logprobs must be at most {self.limits.max_top_logprobs}",
                param="top_logprobs",
            )
        logprobs = top if body.logprobs else None
        reqs, queue = await self.run(
            request, [prompt], [params], adapter, logprobs, body.n, body.stream
        )
        meta = _meta("chatcmpl", body.model)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            events = self.stream_chat(reqs, queue, meta, [prompt], [params], include)
            return _sse(events, self.engine, reqs)
        choices = []
        for i, r in enumerate(reqs):
            lp = None
            if logprobs is not None:
                lp = self.chat_logprobs(r.output, r.token_logprobs, r.top_logprobs)
            choices.append(
                {
                    "index": i,
                    "message": {
                        "role": "assistant",
                        "content": self.tok.decode(r.output),
                        "refusal": None,
                    },
                    "logprobs": lp,
                    "finish_reason": r.finish_reason,
                }
            )
        return {
            **meta,
            "object": "chat.completion",
            "choices": choices,
            "usage": self.usage([prompt], reqs),
        }

    async def completions(self, request: HTTPRequest, body: CompletionBody):
        adapter = self.adapter_for(body.model)
        prompts = self.completion_prompts(body)
        if len(prompts) * body.n > self.limits.max_n:
            raise APIError(400, f"prompts x n must be at most {self.limits.max_n}", param="n")
        params = [self.sampling(body, body.max_tokens, len(p), "prompt") for p in prompts]
        if body.logprobs is not None and body.logprobs > self.limits.max_legacy_logprobs:
            raise APIError(
                400, f"logprobs must be at most {self.limits.max_legacy_logprobs}", param="logprobs"
            )
        reqs, queue = await self.run(
            request, prompts, params, adapter, body.logprobs, body.n, body.stream
        )
        meta = _meta("cmpl", body.model)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            events = self.stream_completions(reqs, queue, meta, prompts, params, include)
            return _sse(events, self.engine, reqs)
        choices = []
        for i, r in enumerate(reqs):
            lp = None
            if body.logprobs is not None:
                lp = self.legacy_logprobs(r.output, r.token_logprobs, r.top_logprobs)
            choices.append(
                {
                    "index": i,
                    "text": self.tok.decode(r.output),
                    "logprobs": lp,
                    "finish_reason": r.finish_reason,
                }
            )
        return {
            **meta,
            "object": "text_completion",
            "choices": choices,
            "usage": self.usage(prompts, reqs),
        }

    async def stream_tokens(self, reqs, queue, params):
        """(choice, text piece, token, logprob, top, finish_reason) as tokens arrive."""
        streams = [
            TextStream(self.tok.decode, params[i // (len(reqs) // len(params))].stop_strings)
            for i in range(len(reqs))
        ]
        remaining = len(reqs)
        while remaining:
            idx, token, lp, top = await queue.get()
            r = reqs[idx]
            if token is None:
                remaining -= 1
                if r.finish_reason == ERROR:
                    raise APIError(500, "generation failed", "server_error")
                yield idx, streams[idx].flush(), None, None, None, r.finish_reason
            else:
                yield idx, streams[idx].push(token), token, lp, top, None

    async def stream_chat(self, reqs, queue, meta, prompts, params, include_usage):
        base = {**meta, "object": "chat.completion.chunk"}
        usage = {"usage": None} if include_usage else {}
        for i in range(len(reqs)):
            yield {
                **base,
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
                **usage,
            }
        async for idx, piece, token, lp, top, finish in self.stream_tokens(reqs, queue, params):
            lps = None
            if token is not None and lp is not None:
                lps = self.chat_logprobs([token], [lp], [top])
            elif not piece and finish is None:
                continue
            delta = {"content": piece} if piece or token is not None else {}
            yield {
                **base,
                "choices": [
                    {"index": idx, "delta": delta, "logprobs": lps, "finish_reason": finish}
                ],
                **usage,
            }
        if include_usage:
            yield {**base, "choices": [], "usage": self.usage(prompts, reqs)}

    async def stream_completions(self, reqs, queue, meta, prompts, params, include_usage):
        base = {**meta, "object": "text_completion"}
        usage = {"usage": None} if include_usage else {}
        offsets = [0] * len(reqs)
        async for idx, piece, token, lp, top, finish in self.stream_tokens(reqs, queue, params):
            lps = None
            if token is not None and lp is not None:
                lps = self.legacy_logprobs([token], [lp], [top], offsets[idx])
            elif not piece and finish is None:
                continue
            offsets[idx] += len(piece)
            yield {
                **base,
                "choices": [
                    {"index": idx, "text": piece, "logprobs": lps, "finish_reason": finish}
                ],
                **usage,
            }
        if include_usage:
            yield {**base, "choices": [], "usage": self.usage(prompts, reqs)}

    # -------------------------------------------------------------- admin

    async def load_adapter(self, name: Any):
        root = self.settings.adapter_root
        if root is None:
            raise APIError(400, "the server has no --adapter-root")
        try:
            check_name(name)
            path = check_adapter_dir(
                resolve_in_root(root, name), self.engine.stacks.selection.max_rank
            )
            await asyncio.to_thread(self.engine.load_adapter, name, path)
        except (UserError, ValueError) as e:
            raise APIError(400, str(e), param="name") from None
        return {"loaded": name, "adapters": self.engine.adapters}

    async def unload_adapter(self, name: str):
        if name not in self.engine.adapters:
            raise APIError(
                404, f"no adapter named {name[:80]!r}", param="name", code="model_not_found"
            )
        try:
            await asyncio.to_thread(self.engine.unload_adapter, name)
        except ValueError as e:
            raise APIError(409, str(e), param="name") from None
        return {"unloaded": name, "adapters": self.engine.adapters}


def _meta(prefix: str, model: str) -> dict[str, Any]:
    """The fields every response and chunk of one request shares."""
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
    }


def _sse(events, engine: Engine, reqs: list[Request]) -> StreamingResponse:
    """Server-sent events ending `data: [DONE]`; the requests are cancelled if the client goes."""

    async def body():
        try:
            async for chunk in events:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            for r in reqs:
                engine.cancel(r)
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def run_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
