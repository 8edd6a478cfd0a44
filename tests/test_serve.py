"""`lmforge serve`: the OpenAI-compatible server, end to end.

A tiny random model with a BPE tokenizer trained here is served by a real `lmforge serve` process on
127.0.0.1 (a free port); the tests talk to it over loopback only, with a bounded number of requests and
timeouts: the official openai client, 32 concurrent streams checked against non-streamed answers, API
keys, limits, malformed input, client disconnects, shutdown, and a schemathesis fuzz of the OpenAPI.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from lmforge import kernels  # noqa: E402
from lmforge.checkpoint import save_checkpoint  # noqa: E402
from lmforge.config import ModelConfig, ServeConfig  # noqa: E402
from lmforge.models.decoder import DecoderLM  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CORPUS = ["Hello world! The quick brown fox jumps over the lazy dog. To be, or not to be, that is the question.\n"
          "ROMEO: But, soft! what light through yonder window breaks?\n"] * 20


def build_checkpoint(path: Path, *, pos: str = "rope", block_size: int = 256, init_std: float = 0.02) -> Path:
    """A random Llama-style model (GQA, RoPE, SwiGLU) and a byte-level BPE tokenizer trained on CORPUS.
    The default init gives nearly uniform next-token distributions: the hardest case for a sampled
    answer to come out the same in every batch makeup."""
    tok = Tokenizer.train_from_iterator(CORPUS, "bpe", vocab_size=320, min_frequency=1)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layers=2, n_heads=4,
                                  n_kv_heads=2, d_model=64, pos=pos, mlp="swiglu", norm="rmsnorm", bias=False,
                                  init_std=init_std, tie_embeddings=False))
    return save_checkpoint(path, model, tokenizer=tok)


class ServerProcess:
    """`python -m lmforge serve CKPT --port 0 ...` in a subprocess; ``url`` once it is up."""

    def __init__(self, model: Path, *args: str, startup_s: float = 120):
        self.model = model
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("LMFORGE_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(model), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.url = None
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:  # keep draining, so the server never blocks on a full pipe
                self.lines.append(line)
                if self.url is None and line.startswith("lmforge serve:") and "http://" in line:
                    self.url = line.split("http://", 1)[1].split("/", 1)[0]
                    self.url = "http://" + self.url
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(startup_s) or self.url is None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.lines[-30:]))
        deadline = time.monotonic() + startup_s
        while True:  # the socket listens before the app has started: wait for /health
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("server did not become healthy:\n" + "".join(self.lines[-30:]))
            time.sleep(0.1)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def server(ckpt):
    """With an API key and small limits (so that fuzzed requests are quick)."""
    s = ServerProcess(ckpt, "--api-key", KEY, "--max-batch", "8", "--max-tokens-limit", "64",
                      "--default-max-tokens", "16", "--max-request-bytes", "200000", "--timeout-s", "120")
    yield s
    rc = s.stop()
    out = "".join(s.lines)
    assert rc == 0 and "lmforge serve: stopped" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


@pytest.fixture(scope="module")
def plain_server(ckpt):
    """Defaults: no key, long generations allowed; its last user stops it (shutdown test)."""
    s = ServerProcess(ckpt, "--shutdown-timeout-s", "20")
    yield s
    s.stop()


def sse_data(resp) -> list[str]:
    """The data fields of a server-sent event stream (one JSON chunk or [DONE] each)."""
    return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def post(server, path: str, body, headers=AUTH, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json", **headers},
                      timeout=60, **kw)


def assert_error(r: httpx.Response, status, *needles: str) -> dict:
    statuses = status if isinstance(status, (tuple, list, range)) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["type"], err
    for n in needles:
        assert n in err["message"], err["message"]
    return err


# --------------------------------------------------------------------------------------------------
# Basics


def test_listens_on_loopback_and_describes_itself(server):
    assert server.url.startswith("http://127.0.0.1:")
    h = server.health()
    assert h["status"] == "ok" and h["model"] == "tiny" and h["slots"] == 8 and h["context_window"] == 256
    assert h["compiled_step"] == kernels.kernel_available()  # the loaded model decodes through lmforge.fused
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health"} <= set(spec["paths"])
    docs = httpx.get(server.url + "/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script src" not in page.text and "<link" not in page.text  # self-contained: works offline


def test_int8_server_answers_like_the_int8_model(tmp_path):
    """`lmforge serve --quantize int8`: the served greedy text is the int8 model's own (a peaked random
    model, so that greedy choices are not near-ties)."""
    from lmforge.lm import LM

    ckpt = build_checkpoint(tmp_path / "peaked", init_std=0.2)
    want = LM.load(ckpt, quantize="int8").generate("To be, or not", max_new_tokens=12, temperature=0.0,
                                                  stop=[])
    s = ServerProcess(ckpt, "--quantize", "int8", "--max-batch", "2")
    try:
        assert s.health()["quantize"] == "int8"
        assert s.health()["compiled_step"] == kernels.kernel_available()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "To be, or not", "max_tokens": 12,
                                                         "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
    finally:
        assert s.stop() == 0


def test_openai_client_completes_chats_and_streams(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]

    c = client.completions.create(model="tiny", prompt="To be, or not", max_tokens=12, temperature=0.9, seed=3)
    assert c.object == "text_completion" and len(c.choices) == 1 and isinstance(c.choices[0].text, str)
    assert c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.prompt_tokens > 0 and 1 <= c.usage.completion_tokens <= 12
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens

    pieces, reasons = [], []
    for chunk in client.completions.create(model="tiny", prompt="To be, or not", max_tokens=12, temperature=0.9,
                                           seed=3, stream=True):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == c.choices[0].text and reasons[-1] == c.choices[0].finish_reason

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=1.0,
                                          top_p=0.95, seed=7)
    msg = chat.choices[0].message
    assert chat.object == "chat.completion" and msg.role == "assistant" and isinstance(msg.content, str)
    # The chat template was applied: the prompt holds both messages plus ChatML's markers.
    assert chat.usage.prompt_tokens > len("You are terse.Hello there!") // 4

    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=1.0,
                                            top_p=0.95, seed=7, stream=True, stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert text == msg.content and finish == chat.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

    many = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=7, n=3)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, seed=7).choices[0].message.content

    greedy = [client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=6, temperature=0).choices[0].text
              for _ in range(2)]
    assert greedy[0] == greedy[1]

    with pytest.raises(openai.BadRequestError, match="context window"):
        client.completions.create(model="tiny", prompt="To be, or not to be. " * 400, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=4)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="hi", max_tokens=4)


def test_stop_strings_and_token_prompts(server):
    r = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 40, "seed": 1, "temperature": 0})
    full = r.json()["choices"][0]["text"]
    assert len(full) > 4
    stop = full[2:4]
    r = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 40, "seed": 1, "temperature": 0,
                                         "stop": [stop]})
    choice = r.json()["choices"][0]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"
    # Token-id prompts, several prompts at once, echo.
    r = post(server, "/v1/completions", {"prompt": [[40, 41], [42]], "max_tokens": 3, "n": 2, "echo": True,
                                         "seed": 5})
    body = r.json()
    assert r.status_code == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 3


# --------------------------------------------------------------------------------------------------
# Limits and bad input: always a 4xx with an OpenAI-style error, never a 500


def test_api_key_is_required(server):
    body = {"prompt": "hi", "max_tokens": 2}
    assert_error(post(server, "/v1/completions", body, headers={}), 401, "API key")
    assert_error(post(server, "/v1/completions", body, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(post(server, "/v1/completions", body, headers={"Authorization": KEY}), 401)  # no "Bearer"
    assert_error(httpx.get(server.url + "/v1/models", timeout=10), 401)
    assert post(server, "/v1/completions", body).status_code == 200
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # health needs no key


def test_prompt_longer_than_the_context_window_is_a_400(server):
    long = "To be, or not to be, that is the question. " * 300
    err = assert_error(post(server, "/v1/completions", {"prompt": long, "max_tokens": 4}), 400, "context window")
    assert err["code"] == "context_length_exceeded" and "256" in err["message"]
    err = assert_error(post(server, "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": long}], "max_tokens": 4}), 400, "context window")
    # A prompt that fits, but not with the room max_tokens asks for.
    fits = "To be, or not to be. " * 20
    assert 256 - 64 < len(Tokenizer.load(server.model).encode(fits)) < 256
    assert_error(post(server, "/v1/completions", {"prompt": fits, "max_tokens": 64}), 400,
                 "context window", "max_tokens")


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b'{"prompt": "hi", "max_tokens": ', 400),
    (b"", 422),
    (b"[]", 422),
    (b'"hello"', 422),
    (b"\xff\xfe\x00", 400),
    ({"prompt": "hi", "max_tokens": "many"}, 422),
    ({"prompt": "hi", "max_tokens": 0}, 422),
    ({"prompt": "hi", "max_tokens": 100000}, 400),  # over --max-tokens-limit
    ({"prompt": "hi", "temperature": -1}, 422),
    ({"prompt": "hi", "temperature": "NaN"}, 422),
    ({"prompt": "hi", "top_p": 0}, 422),
    ({"prompt": "hi", "n": 0}, 422),
    ({"prompt": "hi", "n": 1000}, 400),
    ({"prompt": "hi", "stop": ["a"] * 50}, 400),
    ({"prompt": [], "max_tokens": 2}, 400),
    ({"prompt": [[]], "max_tokens": 2}, 400),
    ({"prompt": [1, 99999], "max_tokens": 2}, 400),
    ({"prompt": [-1], "max_tokens": 2}, 400),
    ({"prompt": "\ud800 lone surrogate", "max_tokens": 2}, 400),
    ({"prompt": "hi", "model": "no-such-model"}, 404),
    ({"prompt": "hi", "logprobs": 2}, 400),
    ({"prompt": "hi", "suffix": "x"}, 400),
    ({"prompt": {"nested": True}}, 422),
])
def test_bad_completion_requests_get_a_4xx(server, body, status):
    if isinstance(body, dict):
        body = json.dumps(body).encode()  # json.dumps keeps the lone surrogate as an escape
    assert_error(post(server, "/v1/completions", body), status)


@pytest.mark.parametrize("body, status", [
    ({}, 422),
    ({"messages": []}, 422),
    ({"messages": "hello"}, 422),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 422),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, 422),
    ({"messages": [{"role": "user", "content": 5}]}, 422),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 65}, 400),
])
def test_bad_chat_requests_get_a_4xx(server, body, status):
    assert_error(post(server, "/v1/chat/completions", body), status)


def test_size_limits_and_unknown_routes(server):
    huge = json.dumps({"prompt": "x" * 300_000}).encode()
    assert_error(post(server, "/v1/completions", huge), 413, "larger than")

    def chunked():  # no Content-Length: the limit applies as the body streams in
        for _ in range(30):
            yield b" " * 10_000
    assert_error(httpx.post(server.url + "/v1/completions", content=chunked(), headers=AUTH, timeout=30), 413)
    assert_error(httpx.get(server.url + "/v1/nothing", headers=AUTH, timeout=10), 404)
    assert_error(httpx.get(server.url + "/v1/completions", headers=AUTH, timeout=10), 405)
    # Content parts are joined; a body sent as form data (curl -d) is read as JSON all the same.
    form = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}
    r = httpx.post(server.url + "/v1/chat/completions", headers=form,
                   content=json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                       "max_tokens": 2}), timeout=30)
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------------------------------
# Continuous batching under load


def _stream_one(url: str, i: int) -> tuple[str, str, bool]:
    path, body = _request(i)
    with httpx.stream("POST", url + path, json={**body, "stream": True}, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200, r.read()
        text, reason, done = "", None, False
        for data in sse_data(r):
            if data == "[DONE]":
                done = True
                continue
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            for ch in chunk["choices"]:
                text += ch.get("text") or (ch.get("delta") or {}).get("content") or ""
                reason = ch["finish_reason"] or reason
    return text, reason, done


def _complete_one(url: str, i: int) -> tuple[str, str]:
    path, body = _request(i)
    r = httpx.post(url + path, json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    return (ch.get("text") if "text" in ch else ch["message"]["content"]), ch["finish_reason"]


def _request(i: int) -> tuple[str, dict]:
    """Request i of the load test: chat and completions, different prompts, lengths and settings."""
    common = {"max_tokens": 16 + (i % 5) * 4, "seed": 1000 + i, "temperature": 1.0, "top_p": 0.9 if i % 3 else 1.0}
    if i % 2:
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": f"Tell me story {i}."}]}
    return "/v1/completions", {**common, "prompt": "ROMEO: " + "But, soft! " * (i % 7) + str(i)}


def test_32_concurrent_streams_lose_no_tokens(server):
    """32 streaming clients at once (8 slots: a queue forms, requests join the running batch as slots
    free up); every stream completes and equals the non-streamed answer for the same seed, which ran
    in a different batch makeup."""
    before = server.health()
    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        streamed = list(pool.map(lambda i: _stream_one(server.url, i), range(32)))
    with ThreadPoolExecutor(32) as pool:
        plain = list(pool.map(lambda i: _complete_one(server.url, i), reversed(range(32))))[::-1]
    assert time.monotonic() - t0 < 120
    for i, ((text, reason, done), (text2, reason2)) in enumerate(zip(streamed, plain)):
        assert done, f"stream {i} did not end with [DONE]"
        assert (text, reason) == (text2, reason2), f"request {i}: streamed and non-streamed answers differ"
    after = server.health()
    tokens, steps = after["tokens"] - before["tokens"], after["steps"] - before["steps"]
    assert tokens / steps > 2, "decode steps should carry several requests at once"
    assert after["active"] == 0 and after["waiting"] == 0


def test_a_client_that_disconnects_frees_its_slot(plain_server):
    server = plain_server
    before = server.health()
    body = {"prompt": "Hello", "max_tokens": 250, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 4:
                break  # leave after a few chunks: closing the response drops the connection
    deadline = time.monotonic() + 20
    while True:
        h = server.health()
        if h["active"] == 0 and h["cancelled"] > before["cancelled"]:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["tokens"] - before["tokens"] < 250


# --------------------------------------------------------------------------------------------------
# Fuzzing the API from its own OpenAPI description


def _fuzz(server, tmp_path, phases: str, examples: int, timeout: int) -> None:
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
              "response_headers_conformance,missing_required_header,unsupported_method,ignored_auth")
    proc = subprocess.run([st, "--no-color", "run", server.url + "/openapi.json", "-H", f"Authorization: Bearer {KEY}",
                           "--checks", checks, "--phases", phases, "--max-examples", str(examples), "--workers", "1",
                           "--seed", "1", "--request-timeout", "60"],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert server.health()["status"] == "ok"


def test_schemathesis_fuzz_finds_no_server_error(server, tmp_path):
    """Random requests from the OpenAPI schema (valid and invalid): no 5xx, and every answer matches
    the documented status codes, content types and schemas."""
    _fuzz(server, tmp_path, "fuzzing,stateful", 10, timeout=180)


@pytest.mark.slow
def test_schemathesis_boundary_values_find_no_server_error(server, tmp_path):
    """Schemathesis' coverage phase: boundary and type-confusion cases for every field (a few hundred)."""
    _fuzz(server, tmp_path, "coverage", 10, timeout=600)


# --------------------------------------------------------------------------------------------------
# Shutdown, timeouts (their own servers)


def start_long_stream(s: ServerProcess) -> tuple[threading.Thread, dict]:
    """A client streaming a 250-token completion in a thread, returned once the server runs it; the
    stream's data fields land in result["data"] when it ends."""
    result: dict = {}

    def client():
        body = {"prompt": "Hello", "max_tokens": 250, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            result["data"] = sse_data(r)

    t = threading.Thread(target=client)
    t.start()
    while s.health()["active"] == 0 and t.is_alive():
        time.sleep(0.02)
    return t, result


def test_shutdown_finishes_in_flight_requests(plain_server):
    """SIGTERM with a stream running: it runs to its end, then the server exits with status 0."""
    s = plain_server
    t, result = start_long_stream(s)
    rc = s.stop()
    t.join(60)
    assert rc == 0, "".join(s.lines)[-3000:]
    data = result["data"]
    assert data[-1] == "[DONE]" and json.loads(data[-2])["choices"][0]["finish_reason"] == "length"
    assert "".join(s.lines).count("Traceback") == 0


@pytest.mark.slow
def test_shutdown_cancels_what_does_not_finish_in_time(ckpt):
    s = ServerProcess(ckpt, "--shutdown-timeout-s", "0")
    t, result = start_long_stream(s)
    t0 = time.monotonic()
    rc = s.stop()
    t.join(60)
    assert rc == 0 and time.monotonic() - t0 < 15
    data = result["data"]
    assert data[-1] == "[DONE]" and "shutting down" in json.loads(data[-2])["error"]["message"]


def test_per_request_timeout(ckpt):
    """In process (FastAPI's TestClient runs the app and its engine): a request past --timeout-s gets 408."""
    from fastapi.testclient import TestClient

    from lmforge.lm import LM
    from lmforge.serve.api import create_app

    lm = LM.load(ckpt)
    app = create_app(lm, ServeConfig(timeout_s=0.05))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 250, "ignore_eos": True})
        assert_error(r, 408, "timed out")
        with client.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 250,
                                                             "ignore_eos": True, "stream": True}) as r:
            data = sse_data(r)
        assert data[-1] == "[DONE]" and "timed out" in json.loads(data[-2])["error"]["message"]
        assert client.get("/health").json()["timed_out"] == 2


def test_shutdown_ends_running_streams_with_an_error_event(ckpt):
    """In process: when the shutdown grace period is over, what still runs ends with an error event and
    [DONE] (the subprocess variant of this is a slow test)."""
    from fastapi.testclient import TestClient

    from lmforge.lm import LM
    from lmforge.serve.api import create_app

    app = create_app(LM.load(ckpt), ServeConfig())
    with TestClient(app) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "Hello", "max_tokens": 250,
                                                             "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            first = next(lines)
            app.state.server.engine.drain(0)
            data = [first[6:]] + [x[6:] for x in lines if x.startswith("data: ")]
        assert data[-1] == "[DONE]" and "shutting down" in json.loads(data[-2])["error"]["message"]
        assert_error(client.post("/v1/completions", json={"prompt": "Hello"}), 503, "shutting down")
