"""Generation through any OpenAI-compatible HTTP server (vLLM, TGI, llama.cpp, `transformers serve`, ...).

Two modes, so the request cache stays honest about what the model saw:

* With `tokenizer_path` (a local Hugging Face tokenizer directory of the served weights), the prompt is
  rendered here with that tokenizer's chat template plus `assistant_prefix`, exactly as the in-process
  transformers backend renders it, and sent to the legacy `/v1/completions` endpoint. The server then
  sees the same text as the in-process backend, and `render()` returns that text.
* Without it, the messages go to `/v1/chat/completions` and the server applies its own template.
  `render()` is then a canonical JSON of the messages and the prefix (used only as the cache key).
  The `assistant_prefix` is NOT sent (a generic chat server cannot be asked to continue a partial
  assistant turn); it is prepended to the returned text, unless the reply already starts with it.
  Use `tokenizer_path` whenever the prefix has to steer the model.

Both modes: stop strings are sent to the server and applied again client side (cut at the first one),
and `assistant_prefix` leads the returned text, as in the in-process backend. Sampling uses top_p=0.95
when temperature > 0, like the other backends. Decoding constraints cannot be applied by a generic
server, so a request carrying one is refused with a ValueError before anything is sent.

Errors. Each request is retried with exponential backoff and full jitter (`backoff_s * 2**attempt`,
capped at `max_backoff_s`) on timeouts, connection failures, HTTP 429 and 5xx; `Retry-After` is honoured
when present (up to max(max_backoff_s, 60) seconds). Other 4xx are not retried. After `max_retries`
retries the request yields `GenerationResult(text="", error="<Kind>: ...")` with Kind one of
ServerUnreachable, Timeout, ServerDisconnected, HTTP429, HTTP5xx, HTTP4xx, BadResponse; such results
are never cached, so a rerun retries them.

Unreachable-server rule: if a request exhausts its retries and its last attempt could not even connect
(connection refused, unknown host), the whole call is aborted and a `ConnectionError` naming the base
URL is raised ("cannot reach the OpenAI-compatible server at http://...: ..."). A misconfigured URL, a
dead server or one killed mid-stage thus fails the stage clearly instead of producing a run of error
rows; every answer finished before that is already in the request cache (CachedLLM stores them as they
arrive), so the rerun regenerates only the rest. A server that is alive but slow or overloaded (timeouts,
429, 5xx) gives per-request errors instead.

HTTP client: `httpx` if importable, else `httpx2` (the same API under another module name), else
`urllib` in a thread pool; all three keep the same asyncio structure with `concurrency` requests in
flight. `timeout_s` bounds each attempt (connect phase at most 10 s).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import http.client
import importlib
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .base import GenerationRequest, GenerationResult, ProgressFn, ResultFn, cut_at_stop

log = logging.getLogger(__name__)

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
_MAX_RETRY_AFTER_S = 60.0


def _find_httpx() -> Any | None:
    """The first importable httpx-compatible module; httpx2 ships the same API under its own name."""
    for name in ("httpx", "httpx2"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def default_http_client() -> str:
    mod = _find_httpx()
    return mod.__name__ if mod is not None else "urllib"


class _Unreachable(Exception):
    """No connection could be made (refused, DNS failure, connect timeout)."""


class _Timeout(Exception):
    """Connected, but the response did not arrive within the timeout."""


class _Disconnected(Exception):
    """Connected, but the connection broke before a complete response."""


class _ServerDown(Exception):
    """Raised inside the event loop to abort the call; turned into ConnectionError outside."""


@dataclass
class _Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


class _HttpxTransport:
    """Async POST with an httpx-compatible module; errors mapped to the three transport failure kinds."""

    def __init__(self, mod: Any, timeout_s: float, concurrency: int, headers: dict[str, str]):
        self.mod = mod
        timeout = mod.Timeout(timeout_s, connect=min(10.0, timeout_s))
        limits = mod.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = mod.AsyncClient(timeout=timeout, limits=limits, headers=headers)

    async def post(self, url: str, payload: dict[str, Any]) -> _Reply:
        m = self.mod
        try:
            r = await self.client.post(url, json=payload)
            body = r.content
        except (m.ConnectError, m.ConnectTimeout) as exc:
            raise _Unreachable(f"{type(exc).__name__}: {exc}") from exc
        except m.TimeoutException as exc:
            raise _Timeout(f"{type(exc).__name__}: {exc}") from exc
        except m.TransportError as exc:
            raise _Disconnected(f"{type(exc).__name__}: {exc}") from exc
        return _Reply(r.status_code, dict(r.headers), body)

    async def aclose(self) -> None:
        await self.client.aclose()


class _UrllibTransport:
    """Blocking urllib calls in a thread pool, so the stdlib alone still gives bounded concurrency."""

    def __init__(self, timeout_s: float, concurrency: int, headers: dict[str, str]):
        self.timeout_s = timeout_s
        self.headers = headers
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fi-openai")

    def _post(self, url: str, data: bytes) -> _Reply:
        req = urllib.request.Request(url, data=data, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return _Reply(r.status, dict(r.headers.items()), r.read())
        except urllib.error.HTTPError as exc:
            return _Reply(exc.code, dict(exc.headers.items()) if exc.headers else {}, exc.read() or b"")
        except urllib.error.URLError as exc:  # raised while connecting
            raise _Unreachable(f"{type(exc.reason).__name__}: {exc.reason}") from exc
        except TimeoutError as exc:
            raise _Timeout(f"read timed out after {self.timeout_s}s") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise _Disconnected(f"{type(exc).__name__}: {exc}") from exc

    async def post(self, url: str, payload: dict[str, Any]) -> _Reply:
        data = json.dumps(payload).encode("utf-8")
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._post, url, data)

    async def aclose(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _CallState:
    total: int
    done: int = 0
    tokens: int = 0


class OpenAIBackend:
    """LLMBackend over an OpenAI-compatible server; see the module docstring for modes and error rules."""

    def __init__(
        self,
        base_url: str,
        model: str,
        identity_model: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 60,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 20,
        api_key: str | None = None,
        tokenizer_path: str | None = None,
    ):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.base_url = base_url.rstrip("/")
        # Accept both "http://host:8000" and "http://host:8000/v1".
        self._root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        self.model = model
        self.identity_model = identity_model
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        # The key only ever goes to base_url; the env fallback keeps secrets out of config files.
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.tokenizer_path = str(tokenizer_path) if tokenizer_path else None
        self.http_client = default_http_client()  # "httpx", "httpx2" or "urllib"; tests may override
        self._tokenizer: Any = None
        self._tok_lock = threading.Lock()

    @property
    def identity(self) -> str:
        """Independent of base_url, so the same weights served anywhere share cache entries."""
        return f"openai:{self.identity_model or self.model}"

    @property
    def endpoint(self) -> str:
        return COMPLETIONS if self.tokenizer_path else CHAT_COMPLETIONS

    def _tok(self) -> Any:
        with self._tok_lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            return self._tokenizer

    def render(self, request: GenerationRequest) -> str:
        """The exact prompt text (tokenizer mode) or a canonical JSON of what is sent (chat mode)."""
        messages = request.messages_json()
        if self.tokenizer_path:
            tokenizer = self._tok()
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            else:  # same fallback as the in-process backend
                text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
            return text + request.assistant_prefix
        blob = {"endpoint": CHAT_COMPLETIONS, "messages": messages, "assistant_prefix": request.assistant_prefix}
        return json.dumps(blob, sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    def _payload(self, request: GenerationRequest) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_new_tokens,
            "temperature": request.temperature,
            "seed": request.seed,
            "stream": False,
        }
        if request.temperature > 0:
            payload["top_p"] = 0.95
        if request.stop:
            payload["stop"] = list(request.stop)
        if self.tokenizer_path:
            payload["prompt"] = self.render(request)
        else:
            payload["messages"] = request.messages_json()
        return payload

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: ProgressFn | None = None,
        on_result: ResultFn | None = None,
    ) -> list[GenerationResult]:
        for r in requests:  # refuse before sending anything
            if r.constraint:
                raise ValueError(
                    f"the openai backend cannot apply the {r.constraint[0]!r} decoding constraint (a generic "
                    "OpenAI-compatible server has no structured-decoding hook); set "
                    "instantiation.constrained_excerpts: false / judge.constrained_score: false for stages "
                    "served by this backend"
                )
        if not requests:
            return []
        payloads = [self._payload(r) for r in requests]  # renders here, in the caller's thread
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._run(requests, payloads, progress, on_result))
        # Called from inside a running event loop (e.g. a notebook): use a private loop in a thread.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self._run(requests, payloads, progress, on_result)).result()

    def _transport(self) -> _HttpxTransport | _UrllibTransport:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if self.http_client != "urllib":
            return _HttpxTransport(importlib.import_module(self.http_client), self.timeout_s, self.concurrency, headers)
        return _UrllibTransport(self.timeout_s, self.concurrency, headers)

    async def _run(
        self,
        requests: Sequence[GenerationRequest],
        payloads: list[dict[str, Any]],
        progress: ProgressFn | None,
        on_result: ResultFn | None,
    ) -> list[GenerationResult]:
        transport = self._transport()
        state = _CallState(total=len(requests))
        sem = asyncio.Semaphore(self.concurrency)
        tasks = [
            asyncio.create_task(self._one(transport, sem, state, i, r, p, progress, on_result))
            for i, (r, p) in enumerate(zip(requests, payloads, strict=True))
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except _ServerDown as exc:
            raise ConnectionError(f"cannot reach the OpenAI-compatible server at {self.base_url}: {exc}") from None
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await transport.aclose()

    async def _one(
        self,
        transport: _HttpxTransport | _UrllibTransport,
        sem: asyncio.Semaphore,
        state: _CallState,
        index: int,
        request: GenerationRequest,
        payload: dict[str, Any],
        progress: ProgressFn | None,
        on_result: ResultFn | None,
    ) -> GenerationResult:
        async with sem:
            result = await self._attempts(transport, state, request, payload)
        if on_result:
            on_result(index, result)
        state.done += 1
        state.tokens += result.completion_tokens
        if progress:
            progress(state.done, state.total, state.tokens)
        return result

    async def _attempts(
        self,
        transport: _HttpxTransport | _UrllibTransport,
        state: _CallState,
        request: GenerationRequest,
        payload: dict[str, Any],
    ) -> GenerationResult:
        url = self._root + self.endpoint
        kind, detail = "ServerUnreachable", ""
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            try:
                reply = await transport.post(url, payload)
            except _Unreachable as exc:
                kind, detail = "ServerUnreachable", str(exc)
            except _Timeout as exc:
                kind, detail = "Timeout", f"no response within {self.timeout_s}s ({exc})"
            except _Disconnected as exc:
                kind, detail = "ServerDisconnected", str(exc)
            else:
                if 200 <= reply.status < 300:
                    return self._parse(request, reply.body)
                snippet = reply.body[:300].decode("utf-8", "replace")
                if reply.status == 429:
                    kind, detail = "HTTP429", f"429 Too Many Requests: {snippet}"
                    retry_after = _retry_after(reply.headers)
                elif reply.status >= 500:
                    kind, detail = "HTTP5xx", f"{reply.status}: {snippet}"
                    retry_after = _retry_after(reply.headers)
                else:  # the request itself is wrong; repeating it cannot help
                    return GenerationResult("", error=f"HTTP4xx: {reply.status}: {snippet}")
            if attempt == self.max_retries:
                break
            delay = self._delay(attempt, retry_after)
            log.debug("%s on %s (attempt %d), retrying in %.2fs", kind, url, attempt + 1, delay)
            await asyncio.sleep(delay)
        if kind == "ServerUnreachable":
            raise _ServerDown(detail)
        log.warning("giving up on a request to %s after %d attempts: %s: %s", url, self.max_retries + 1, kind, detail)
        return GenerationResult("", error=f"{kind}: {detail} (after {self.max_retries + 1} attempts)")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter spreads retries of many concurrent requests; the server's Retry-After wins when given."""
        if retry_after is not None:
            return min(retry_after, max(self.max_backoff_s, _MAX_RETRY_AFTER_S))
        return random.uniform(0.0, min(self.max_backoff_s, self.backoff_s * 2**attempt))

    def _parse(self, request: GenerationRequest, body: bytes) -> GenerationResult:
        try:
            data = json.loads(body)
            choice = data["choices"][0]
            if self.tokenizer_path:
                text = choice.get("text")
            else:
                text = (choice.get("message") or {}).get("content")
            usage = data.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            snippet = body[:300].decode("utf-8", "replace")
            return GenerationResult("", error=f"BadResponse: {type(exc).__name__}: {exc}: {snippet}")
        text = cut_at_stop(text or "", request.stop)
        prefix = request.assistant_prefix
        # In chat mode the server never saw the prefix; do not double it if the model wrote it itself.
        if not (not self.tokenizer_path and prefix and text.startswith(prefix)):
            text = prefix + text
        return GenerationResult(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds, from either a number or an HTTP date; None when absent or unreadable."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
