"""``ffnskip serve``: the OpenAI client against a server on a loopback port, on the tiny chat
model (and once on SmolLM2): answers equal ``generate``, streaming, concurrency, cancellation,
cache reuse, bad requests, authentication, the queue limit, metrics and SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import ffnskip_ext
from conftest import smollm2_path

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from ffnskip_ext.runtime.session import ChatSession  # noqa: E402
from ffnskip_ext.serve import create_app  # noqa: E402  (needs starlette)

KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 512
LONG_CONTEXT = 20000  # a long generation on the tiny model: tens of seconds, never waited for


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """The app on uvicorn in a thread, on a socket bound here (no port race)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def model_dir(tiny_chat_model_dir) -> Path:
    return tiny_chat_model_dir


@pytest.fixture(scope="module")
def name(model_dir) -> str:
    return model_dir.name


@pytest.fixture(scope="module")
def url(model_dir) -> Iterator[str]:
    """Two workers, an API key."""
    app = create_app(model_dir, workers=2, num_threads=1, max_seq_len=CONTEXT, api_key=KEY,
                     queue_size=8)
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def one_worker_url(model_dir) -> Iterator[str]:
    """One worker, one place in the queue, a context long enough to keep it busy."""
    app = create_app(model_dir, workers=1, num_threads=1, max_seq_len=LONG_CONTEXT,
                     queue_size=1)
    with serving(app) as base:
        yield base


def client(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return ffnskip_ext.load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def no_eos(tokenizer) -> dict[str, float]:
    """A logit_bias that bans the end of sequence: the tiny model is random, and this keeps
    a request going for all of its max_tokens."""
    return {str(tokenizer.eos_token_id): -100.0}


@pytest.fixture(scope="module")
def reference(model_dir, tokenizer):
    """generate() on a fresh decoder (with a logit_bias, a fresh ChatSession, which is
    generate() with more options): what the server must answer."""
    decoder = ffnskip_ext.Decoder.from_pretrained(model_dir, max_seq_len=CONTEXT, num_threads=1)

    def run(prompt, policy=None, logit_bias=None, **kwargs):
        decoder.set_policy(policy or ffnskip_ext.DensePolicy())
        if logit_bias:
            return ChatSession(decoder, tokenizer).generate(
                prompt, logit_bias={int(k): v for k, v in logit_bias.items()}, **kwargs)
        return ffnskip_ext.generate(decoder, tokenizer, prompt, **kwargs)

    return run


def chat(messages: str | list, **kwargs) -> dict:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return {"messages": messages, "temperature": 0, "max_tokens": 16, **kwargs}


def metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    return values


def finish_reason(result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def test_greedy_answers_equal_generate(url, name, reference) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is a tiny model?"}]
    answer = client(url).chat.completions.create(model=name, **chat(messages, max_tokens=24))
    want = reference(messages, max_new_tokens=24)
    assert answer.choices[0].message.content == want.text
    assert answer.choices[0].finish_reason == finish_reason(want)
    assert answer.usage.completion_tokens == len(want.token_ids)
    assert answer.usage.prompt_tokens == want.prompt_tokens
    assert answer.usage.total_tokens == want.prompt_tokens + len(want.token_ids)
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"

    text = client(url).completions.create(model=name, prompt="Plain text prompt",
                                          max_tokens=10, temperature=0)
    want = reference("Plain text prompt", max_new_tokens=10)
    assert text.choices[0].text == want.text and text.object == "text_completion"
    assert text.usage.completion_tokens == len(want.token_ids)


@pytest.mark.parametrize("mode", ["ngram", "self"])
def test_speculative_answers_equal_plain_generate(url, name, reference, mode) -> None:
    body = chat("Repeat: the cat sat on the mat, the cat sat on the mat.", max_tokens=24)
    before = metrics(url)
    answer = client(url).chat.completions.create(
        model=name, extra_body={"ffnskip": {"speculative": mode}}, **body)
    want = reference(body["messages"], max_new_tokens=24)
    assert answer.choices[0].message.content == want.text
    if mode == "ngram":  # the repeated prompt has matches; a self draft on this random tiny
        # model may stop before its first token (its top-1 probabilities are low)
        drafted = "ffnskip_speculative_drafted_tokens_total"
        assert metrics(url)[drafted] > before.get(drafted, 0.0)


def test_streaming_deltas_concatenate_to_the_answer(url, name, reference) -> None:
    body = chat("Stream this, please.", max_tokens=20)
    chunks = list(client(url).chat.completions.create(
        model=name, stream=True, stream_options={"include_usage": True}, **body))
    want = reference(body["messages"], max_new_tokens=20)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-2].choices[0].finish_reason == finish_reason(want)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert len({c.id for c in chunks}) == 1

    # The wire format: data lines, the final chunk with its finish reason, then [DONE].
    with httpx.stream("POST", f"{url}/v1/completions", headers=HEADERS, json={
            "model": name, "prompt": "Raw events", "max_tokens": 8, "temperature": 0,
            "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    pieces = [json.loads(e[6:]) for e in events[:-1]]
    want = reference("Raw events", max_new_tokens=8)
    assert "".join(p["choices"][0]["text"] for p in pieces) == want.text
    assert pieces[-1]["choices"][0]["finish_reason"] == finish_reason(want)
    assert all(p["choices"][0]["finish_reason"] is None for p in pieces[:-1])


def test_concurrent_requests_are_all_answered(url, name, reference) -> None:
    prompts = [f"Concurrent request number {i}" for i in range(4)]  # 2 x workers

    def ask(prompt: str) -> str:
        answer = client(url).chat.completions.create(model=name,
                                                     **chat(prompt, max_tokens=48))
        return answer.choices[0].message.content

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    for prompt, answer in zip(prompts, answers, strict=True):
        assert answer == reference([{"role": "user", "content": prompt}],
                                   max_new_tokens=48).text


def test_the_next_chat_turn_reuses_the_cache(url, name, reference) -> None:
    turn1 = [{"role": "user", "content": "A conversation about caches."}]
    first = client(url).chat.completions.create(model=name, **chat(turn1))
    before = metrics(url)
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And the second turn?"}]
    second = client(url).chat.completions.create(model=name, **chat(turn2))
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens  # turn 1's prompt, and its answer as it re-encodes
    assert second.choices[0].message.content == reference(turn2, max_new_tokens=16).text
    assert metrics(url)["ffnskip_cached_prompt_tokens_total"] - before[
        "ffnskip_cached_prompt_tokens_total"] == cached


def test_a_policy_per_request(url, name, reference, no_eos) -> None:
    policy = {"kind": "ffn_skip", "version": 1, "threshold": -1.0, "warmup_tokens": 0,
              "cold_start": 1, "cold_end": 1, "full_token_interval": 0}
    before = metrics(url)
    body = chat("Skip some FFN blocks.", max_tokens=24, logit_bias=no_eos)  # 23 decode steps
    skipped = client(url).chat.completions.create(
        model=name, extra_body={"ffnskip": {"policy": policy}}, **body)
    want = reference(body["messages"], ffnskip_ext.load_policy(policy), no_eos,
                     max_new_tokens=24)
    assert skipped.choices[0].message.content == want.text
    after = metrics(url)
    assert after["ffnskip_ffn_blocks_skipped_total"] > before["ffnskip_ffn_blocks_skipped_total"]
    assert after["ffnskip_ffn_skip_ratio"] > 0
    dense = client(url).chat.completions.create(model=name, **body)  # the server's default
    assert dense.choices[0].message.content == reference(body["messages"], None, no_eos,
                                                         max_new_tokens=24).text
    assert metrics(url)["ffnskip_ffn_blocks_skipped_total"] == after[
        "ffnskip_ffn_blocks_skipped_total"]


BAD_CHAT = [
    (b'{"model": "M", "messages": [', None),
    (b"[1, 2]", None),
    # NaN is not JSON (Python's json module reads it unless told not to)
    (b'{"model": "M", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
     None),
    ({"model": None}, "model"),
    ({"model": "gpt-unknown"}, "model"),
    ({"messages": None}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "no role"}]}, "messages[0].role"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": CONTEXT}, "max_tokens"),  # with the prompt, beyond the context
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x" * CONTEXT}]}, "messages"),
    ({"n": 2}, "n"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", 1]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logprobs": True}, "logprobs"),
    ({"logit_bias": []}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "up"}}, "logit_bias"),
    ({"ffnskip": {"policy": "nonsense"}}, "ffnskip.policy"),
    ({"ffnskip": {"policy": 5}}, "ffnskip.policy"),
    ({"ffnskip": {"policy": {"kind": "static_ffn", "version": 1, "layers": [99]}}},
     "ffnskip.policy"),
    ({"ffnskip": {"policy": {"kind": ["list"]}}}, "ffnskip.policy"),
    ({"ffnskip": {"policy": {"kind": "first", "version": 1, "routers": "/etc/passwd"}}},
     "ffnskip.policy"),
    ({"ffnskip": {"policy": "first"}}, "ffnskip.policy"),  # no routers beside this model
    ({"ffnskip": {"polcy": "dense"}}, "ffnskip"),
    ({"ffnskip": {"speculative": "beam"}}, "ffnskip.speculative"),
    ({"ffnskip": {"speculative": 3}}, "ffnskip.speculative"),
    # FFN-SkipLLM decides per token: it cannot verify drafts
    ({"ffnskip": {"policy": "ffn-skip", "speculative": "ngram"}}, None),
]
BAD_COMPLETIONS = [
    ({"prompt": None}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["two", "prompts"]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [10**6]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "y" * CONTEXT}, "prompt"),
    ({"prompt": "ok", "echo": True}, "echo"),
]


def post(base: str, path: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{base}{path}", content=body, timeout=60,
                      headers={**HEADERS, "Content-Type": "application/json"})


def bad_request_body(case, name: str, base: dict) -> bytes:
    if isinstance(case, bytes):
        return case.replace(b'"M"', json.dumps(name).encode())
    return json.dumps({"model": name, **base, **case}).encode()


@pytest.mark.parametrize("path, case, param", [
    *[("/v1/chat/completions", case, param) for case, param in BAD_CHAT],
    *[("/v1/completions", case, param) for case, param in BAD_COMPLETIONS],
])
def test_bad_requests_get_400_with_an_error_body(url, name, path, case, param) -> None:
    base = ({"messages": [{"role": "user", "content": "x"}]} if "chat" in path
            else {"prompt": "x"})
    response = post(url, path, bad_request_body(case, name, base))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert param in (error["param"] or ""), error


def test_the_server_serves_after_bad_requests(url, name) -> None:
    for case, _ in BAD_CHAT[:6]:
        post(url, "/v1/chat/completions", bad_request_body(case, name, {}))
    answer = client(url).chat.completions.create(model=name, **chat("Still there?"))
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_the_api_key_is_required_on_v1(url, name) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong-key").chat.completions.create(model=name, **chat("hi"))
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/completions")):
        response = httpx.request(method, f"{url}{path}", json={"model": name, "prompt": "x"})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert [m.id for m in client(url).models.list()] == [name]
    assert httpx.get(f"{url}/health").status_code == 200


def test_metrics_count_requests_and_tokens(url, name, no_eos) -> None:
    before = metrics(url)
    answer = client(url).chat.completions.create(
        model=name, **chat("Count me.", max_tokens=9, logit_bias=no_eos))
    post(url, "/v1/chat/completions", b"{")
    after = metrics(url)

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta('ffnskip_requests_total{endpoint="/v1/chat/completions",code="200"}') == 1
    assert delta('ffnskip_requests_total{endpoint="/v1/chat/completions",code="400"}') == 1
    assert delta("ffnskip_prompt_tokens_total") == answer.usage.prompt_tokens
    assert delta("ffnskip_generation_tokens_total") == answer.usage.completion_tokens == 9
    assert delta("ffnskip_decode_steps_total") == 8  # the last token is not fed back
    assert after["ffnskip_decode_tokens_per_second"] > 0
    assert after["ffnskip_workers"] == 2 and after["ffnskip_queue_length"] == 0


@contextlib.contextmanager
def long_stream(base: str, name: str, no_eos: dict[str, float],
                max_tokens: int = LONG_CONTEXT - 100) -> Iterator:
    """A streaming chat request that ends only at max_tokens (minutes by default), open once
    its first text arrived; yields its remaining lines. Leaving closes the connection."""
    body = chat("Talk for a long time.", max_tokens=max_tokens, logit_bias=no_eos)
    with httpx.stream("POST", f"{base}/v1/chat/completions", headers=HEADERS, timeout=60,
                      json={**body, "model": name, "stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get(
                    "content"):
                yield lines
                return
        raise AssertionError("the stream ended before any text")


def test_a_client_leaving_mid_stream_frees_its_worker(one_worker_url, name, no_eos) -> None:
    before = metrics(one_worker_url)
    with long_stream(one_worker_url, name, no_eos):
        pass  # leaves after the first piece of text
    start = time.monotonic()
    answer = client(one_worker_url).chat.completions.create(model=name, **chat("Next!"))
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert time.monotonic() - start < 30  # the long generation would take minutes
    after = metrics(one_worker_url)
    assert after["ffnskip_cancelled_requests_total"] == before.get(
        "ffnskip_cancelled_requests_total", 0) + 1


def test_a_full_queue_gets_429_with_retry_after(one_worker_url, name, no_eos) -> None:
    with ThreadPoolExecutor(1) as pool:
        with long_stream(one_worker_url, name, no_eos):  # the worker is busy
            waiting = pool.submit(client(one_worker_url).chat.completions.create, model=name,
                                  **chat("Waiting in the queue.", max_tokens=4))
            deadline = time.monotonic() + 30
            while httpx.get(f"{one_worker_url}/health").json()["queue"] < 1:
                assert time.monotonic() < deadline and not waiting.done()
                time.sleep(0.05)
            refused = httpx.post(f"{one_worker_url}/v1/chat/completions", timeout=30,
                                 json={**chat("No room."), "model": name})
            assert refused.status_code == 429
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["error"]["code"] == "queue_full"
        assert waiting.result(timeout=30).choices[0].finish_reason in ("stop", "length")


def test_an_internal_error_gives_500_and_a_fresh_decoder(one_worker_url, name,
                                                         monkeypatch) -> None:
    body = {**chat("Fail once."), "model": name}
    ask = client(one_worker_url).chat.completions.create
    ask(**body)
    assert ask(**body).usage.prompt_tokens_details.cached_tokens > 0
    generate = ChatSession.generate

    def failing(*args, **kwargs):
        monkeypatch.setattr(ChatSession, "generate", generate)
        raise RuntimeError("injected failure")

    monkeypatch.setattr(ChatSession, "generate", failing)
    failed = httpx.post(f"{one_worker_url}/v1/chat/completions", json=body, timeout=30)
    assert failed.status_code == 500
    assert "injected failure" in failed.json()["error"]["message"]
    again = ask(**body)  # a new decoder: nothing cached
    assert again.usage.prompt_tokens_details.cached_tokens == 0


def wait_for_health(base: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the server did not start"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base}/health").status_code == 200:
                return
        time.sleep(0.2)


def test_sigterm_finishes_or_cancels_in_flight_requests_and_exits_0(model_dir, name,
                                                                   no_eos) -> None:
    with socket.socket() as sock:  # a free port for the subprocess
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(ffnskip_ext.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "ffnskip_ext", "serve", "--model", str(model_dir), "--port",
         str(port), "--workers", "2", "--threads", "1", "--max-seq-len", str(LONG_CONTEXT),
         "--shutdown-timeout", "2", "--api-key", KEY],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for_health(base, process)
        with (long_stream(base, name, no_eos) as endless,
              long_stream(base, name, no_eos, max_tokens=64) as short):
            process.send_signal(signal.SIGTERM)
            rest = [line for line in short if line]  # finishes within the shutdown timeout
            assert rest[-1] == "data: [DONE]"
            assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
            with contextlib.suppress(httpx.HTTPError):  # cut off when the timeout is over
                assert "data: [DONE]" not in list(endless)
        assert process.wait(timeout=60) == 0, process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_greedy_answer_equals_generate_on_smollm2() -> None:
    """Served by its model name; fp32 (the file's exact values), as in test_generate's CLI
    test, since the Q4_1 weights as stored tip the near-tie first token away from Paris."""
    path = smollm2_path()
    tokenizer = ffnskip_ext.load_tokenizer(path)
    decoder = ffnskip_ext.Decoder.from_pretrained(path, dtype="float32", num_threads=1)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    want = ffnskip_ext.generate(decoder, tokenizer, messages, max_new_tokens=12)
    del decoder
    app = create_app("smollm2-135m", workers=1, dtype="float32", num_threads=1,
                     max_seq_len=1024)
    with serving(app) as base:
        name = client(base).models.list().data[0].id
        assert name == Path(path).name.removesuffix(".gguf")
        answer = client(base).chat.completions.create(model=name, messages=messages,
                                                      max_tokens=12, temperature=0)
    assert "Paris" in want.text
    assert answer.choices[0].message.content == want.text
    assert answer.usage.completion_tokens == len(want.token_ids)


def test_serve_takes_the_model_options_of_the_other_commands() -> None:
    """The same --model, --dtype (default auto), ... as generate, and a model name or path
    resolved as they resolve it: a hub name is refused before anything is loaded."""
    from ffnskip_ext.cli import build_parser, main

    parser = build_parser()
    served, generated = parser.parse_args(["serve"]), parser.parse_args(["generate", "hi"])
    for option in ("model", "device", "dtype", "max_seq_len", "threads"):
        assert getattr(served, option) == getattr(generated, option)
    with pytest.raises(FileNotFoundError, match="not a local path"):
        create_app("someone/some-model")
    assert main(["serve", "--model", "someone/some-model"]) == 2
