"""The OpenAI-compatible backend against real HTTP servers on 127.0.0.1: a scripted stdlib server for the
retry and error rules, and `transformers serve` with the embedded SmolLM2 for parity with the in-process
backend, the request cache, and the unreachable-server rule.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fineinstructions_core.llm.base import ChatMessage, GenerationRequest
from fineinstructions_core.llm.cache import CachedLLM, RequestCache
from fineinstructions_core.llm.local_server import serving_missing, start_server, stop_server
from fineinstructions_core.llm.models import resolve_llm
from fineinstructions_core.llm.openai_backend import OpenAIBackend, default_http_client

CACHE = Path(os.environ.get("FI_MODEL_CACHE", str(Path.home() / ".cache" / "fineinstructions-tests")))
MODEL = "embedded:smollm2-135m-instruct"
CLIENTS = sorted({default_http_client(), "urllib"})  # the preferred async client and the stdlib fallback


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_llm(MODEL, CACHE)[0]


def _req(question: str, **kw: Any) -> GenerationRequest:
    return GenerationRequest(model=MODEL, messages=(ChatMessage("user", question),), **kw)


def _completion(text: str, prompt_tokens: int = 11, completion_tokens: int = 3) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return {"object": "text_completion", "choices": [{"index": 0, "text": text}], "usage": usage}


def _chat(text: str) -> dict[str, Any]:
    return {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


# ---------------------------------------------------------------- a scripted server (retries, errors)


class ScriptedServer:
    """Answers POSTs from a script: each step is {"status", "json", "headers", "sleep"}; the last step repeats."""

    def __init__(self, steps: list[dict[str, Any]]):
        self.steps = list(steps)
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        script = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with script.lock:
                    script.seen.append((self.path, body))
                    step = script.steps.pop(0) if len(script.steps) > 1 else script.steps[0]
                time.sleep(step.get("sleep", 0))
                data = json.dumps(step.get("json", {"error": "scripted"})).encode()
                try:
                    self.send_response(step.get("status", 200))
                    for k, v in step.get("headers", {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out first
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _fast(url: str, **kw: Any) -> OpenAIBackend:
    opts: dict[str, Any] = {"max_retries": 5, "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 5}
    return OpenAIBackend(url, "served-smol", **{**opts, **kw})


@pytest.mark.parametrize("client", CLIENTS)
def test_429_with_retry_after_then_success(model_dir: Path, client: str) -> None:
    steps = [{"status": 429, "headers": {"Retry-After": "0"}}] * 3 + [{"json": _completion("Paris.\n\nMore", 9, 4)}]
    with ScriptedServer(steps) as srv:
        backend = _fast(srv.url + "/v1", tokenizer_path=str(model_dir))
        backend.http_client = client
        req = _req("capital of france?", max_new_tokens=24, seed=3, stop=("\n\n",), assistant_prefix="Answer:")
        progress: list[tuple[int, int, int]] = []
        [res] = backend.generate([req], progress=lambda *a: progress.append(a))
    assert len(srv.seen) == 4  # three 429s, then the answer
    assert res.error is None and res.text == "Answer:Paris."  # prefix prepended, cut at the stop string
    assert (res.prompt_tokens, res.completion_tokens) == (9, 4)
    assert progress == [(1, 1, 4)]
    path, body = srv.seen[-1]
    assert path == "/v1/completions" and body["prompt"] == backend.render(req)
    assert body["prompt"].endswith("<|im_start|>assistant\nAnswer:")
    assert {k: body[k] for k in ("model", "max_tokens", "temperature", "seed", "stop")} == {
        "model": "served-smol",
        "max_tokens": 24,
        "temperature": 0.0,
        "seed": 3,
        "stop": ["\n\n"],
    }


@pytest.mark.parametrize("client", CLIENTS)
def test_5xx_and_timeouts_are_retried_other_4xx_are_not(model_dir: Path, client: str) -> None:
    steps = [{"status": 500}, {"status": 503}, {"sleep": 1.0, "json": _completion("late")}, {"json": _completion("ok")}]
    with ScriptedServer(steps) as srv:
        backend = _fast(srv.url, tokenizer_path=str(model_dir), timeout_s=0.3)
        backend.http_client = client
        [res] = backend.generate([_req("hi")])
    assert res.error is None and res.text == "ok" and len(srv.seen) == 4

    with ScriptedServer([{"status": 400, "json": {"error": "bad max_tokens"}}]) as srv:
        backend = _fast(srv.url, tokenizer_path=str(model_dir))
        backend.http_client = client
        [res] = backend.generate([_req("hi")])  # an error result, not an exception
    assert len(srv.seen) == 1
    assert res.text == "" and res.error.startswith("HTTP4xx: 400") and "bad max_tokens" in res.error


def test_retries_exhausted_give_error_results(model_dir: Path) -> None:
    with ScriptedServer([{"status": 429, "headers": {"Retry-After": "0.25"}}]) as srv:
        backend = _fast(srv.url, tokenizer_path=str(model_dir), max_retries=2)
        start = time.perf_counter()
        results = backend.generate([_req("a"), _req("b")])
    assert time.perf_counter() - start >= 0.5  # Retry-After wins over the (tiny) configured backoff
    assert len(srv.seen) == 6  # 2 requests x (1 + 2 retries)
    assert all(r.text == "" and r.error.startswith("HTTP429:") for r in results)


def test_chat_mode_without_tokenizer() -> None:
    with ScriptedServer([{"json": _chat("<feedback>fine.</feedback>")}, {"json": _chat(" short")}]) as srv:
        backend = _fast(srv.url, identity_model="smol@v1", concurrency=1)  # scripted replies go in order
        reqs = [_req("judge this", assistant_prefix="<feedback>"), _req("x", assistant_prefix="<feedback>")]
        results = backend.generate(reqs)
    assert [r.text for r in results] == ["<feedback>fine.</feedback>", "<feedback> short"]  # never doubled
    assert {p for p, _ in srv.seen} == {"/v1/chat/completions"}
    assert srv.seen[0][1]["messages"] == [{"role": "user", "content": "judge this"}]
    assert json.loads(backend.render(reqs[0]))["assistant_prefix"] == "<feedback>"
    assert (
        backend.identity == "openai:smol@v1" and _fast("http://x", identity_model=None).identity == "openai:served-smol"
    )


def test_generate_inside_a_running_event_loop() -> None:
    async def main() -> str:
        with ScriptedServer([{"json": _chat("hello")}]) as srv:
            return _fast(srv.url).generate([_req("hi")])[0].text

    assert asyncio.run(main()) == "hello"


def test_constraints_are_refused_before_sending() -> None:
    with ScriptedServer([{"json": _chat("x")}]) as srv:
        backend = _fast(srv.url)
        with pytest.raises(ValueError, match=r"'excerpt_copy'.*constrained_excerpts: false"):
            backend.generate([_req("a"), _req("b", constraint=("excerpt_copy", "source text"))])
        with pytest.raises(ValueError, match=r"'score'.*judge.constrained_score: false"):
            backend.generate([_req("c", constraint=("score", "1", "2", "3"))])
    assert srv.seen == []


def test_unreachable_server_raises_connection_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match=f"cannot reach the OpenAI-compatible server at {url}"):
        _fast(url, max_retries=2).generate([_req(str(i)) for i in range(20)])
    assert time.perf_counter() - start < 5


# ---------------------------------------------------------------- transformers serve (a real model server)


@pytest.fixture
def served_model(model_dir: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    reason = serving_missing()
    if reason:
        pytest.skip(reason)
    url, proc = start_server(model_dir, tmp_path / "serve.log")
    try:
        yield url, proc
    finally:
        stop_server(proc)


def test_transformers_serve_matches_in_process_and_caches(
    served_model: tuple[str, subprocess.Popen], model_dir: Path, tmp_path: Path
) -> None:
    from fineinstructions_core.llm.transformers_backend import TransformersBackend

    url, proc = served_model
    local = TransformersBackend(MODEL, CACHE, batch_size=1)
    backend = OpenAIBackend(
        url,
        model=str(model_dir),
        identity_model=local.identity,
        concurrency=4,
        max_retries=2,
        backoff_s=0.1,
        tokenizer_path=str(model_dir),
    )
    reqs = [
        _req("What is the capital of France?", max_new_tokens=24),
        _req("Name three primary colors.", max_new_tokens=24, stop=("\n",)),
        _req("Write a haiku about the sea.", max_new_tokens=24, stop=("\n\n",)),
        _req("Is water wet? Answer briefly.", max_new_tokens=24, assistant_prefix="The answer is"),
    ]
    assert [backend.render(r) for r in reqs] == [local.render(r) for r in reqs]  # the server sees the same text
    assert backend.identity == f"openai:{local.identity}"

    llm = CachedLLM(backend, RequestCache(tmp_path / "requests.sqlite"))
    progress: list[tuple[int, int, int]] = []
    served = llm.generate(reqs, progress=lambda *a: progress.append(a))
    assert all(r.error is None and r.text for r in served), served
    assert progress[-1][:2] == (4, 4) and progress[-1][2] == sum(r.completion_tokens for r in served)
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in served)

    again = llm.generate(reqs)
    assert all(r.cached for r in again) and [r.text for r in again] == [r.text for r in served]
    assert llm.stats.cache_hits == 4 and llm.stats.cache_misses == 4

    in_process = local.generate(reqs)
    # Greedy decoding, float32 on CPU, the same prompt text and token ids: the texts must agree exactly.
    assert [r.text for r in served] == [r.text for r in in_process]
    assert [r.prompt_tokens for r in served] == [r.prompt_tokens for r in in_process]
    assert served[3].text.startswith("The answer is")

    stop_server(proc, signal.SIGKILL)
    with pytest.raises(ConnectionError, match=f"cannot reach the OpenAI-compatible server at {url}"):
        llm.generate([_req("A question the cache has never seen.", max_new_tokens=8)])
    after = llm.generate(reqs)  # the server is gone; earlier answers still come from the cache
    assert all(r.cached for r in after) and [r.text for r in after] == [r.text for r in served]
