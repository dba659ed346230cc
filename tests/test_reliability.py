"""Reliability: hostile files, leaks, threads and interruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

import ffnskip_ext
from ffnskip_ext.config import ModelConfig
from random_models import random_decoder, slow_prefill_decoder
from test_checkpoint import encode, random_weights, write_gguf

HERE = Path(__file__).resolve().parent


def small_config() -> ModelConfig:
    return ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                       num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       tie_word_embeddings=True)


def test_fuzzed_checkpoints_load_or_fail_cleanly(tiny_model_dir, tmp_path) -> None:
    """Thousands of mutated safetensors and GGUF files (truncations, bit flips, edited header
    fields), in a separate process with a memory cap: each loads or raises a clear error. The
    GGUF files: Q8_0, and one mixing every block type (the K-quants' 256-blocks, Q4_1, Q5_x)."""
    from test_quantized_models import TINY_FILES, tiny_tensors

    _, model_dir = tiny_model_dir("llama_mha_tied")
    config = small_config()
    q8 = write_gguf(tmp_path / "q8.gguf", config,
                    encode(random_weights(config), gguf.GGMLQuantizationType.Q8_0))
    mixed = write_gguf(tmp_path / "mixed.gguf", *tiny_tensors(*TINY_FILES["mixed"], seed=3))
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, str(HERE / "fuzz" / "fuzz_loaders.py"), str(model_dir),
         f"{q8},{mixed}", str(work), "2500", "150", "7"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-2000:])
    outcomes = eval(done.stdout.strip().splitlines()[-1])  # the fuzzer's summary dict
    assert sum(outcomes.values()) >= 1000, outcomes
    for kind in ("st", "q8", "mixed"):
        assert outcomes.get(f"{kind}: loaded") and outcomes.get(f"{kind}: ValueError"), outcomes


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_reported(bad) -> None:
    config = small_config()
    weights = random_weights(config)
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = bad
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj.weight' contains"):
        ffnskip_ext.Decoder(config, weights)


def test_bad_gguf_magic_and_truncation(tmp_path) -> None:
    config = small_config()
    good = write_gguf(tmp_path / "good.gguf", config,
                      encode(random_weights(config), gguf.GGMLQuantizationType.F32))
    data = good.read_bytes()
    bad_magic = tmp_path / "bad.gguf"
    bad_magic.write_bytes(b"GGUX" + data[4:])
    with pytest.raises(ValueError, match="bad.gguf"):
        ffnskip_ext.load_checkpoint(bad_magic)
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.gguf"):
        ffnskip_ext.load_checkpoint(truncated)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_hidden_layers", 10**9, "num_layers"),
        ("num_hidden_layers", 0, "num_layers"),
        ("hidden_size", -64, "hidden_size"),
        ("num_attention_heads", 5, "must divide hidden_size"),
        ("num_key_value_heads", 3, "num_kv_heads"),
        ("vocab_size", 2**40, "vocab_size"),
    ],
)
def test_absurd_configs_fail_before_anything_is_sized(tiny_model_dir, tmp_path, field, value,
                                                      message) -> None:
    import json
    import shutil

    _, path = tiny_model_dir("llama_mha_tied")
    target = tmp_path / "m"
    shutil.copytree(path, target)
    config = json.loads((target / "config.json").read_text())
    config[field] = value
    config.pop("head_dim")  # without it, the head count must divide the hidden size
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        ffnskip_ext.load_checkpoint(target)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_no_leaks_across_decoders_and_cycles(tiny_model_dir) -> None:
    _, path = tiny_model_dir("llama_gqa_untied_h72")
    config, weights = ffnskip_ext.load_checkpoint(path)

    def cycle_decoders(count: int) -> None:
        for _ in range(count):
            d = ffnskip_ext.Decoder(config, weights, max_seq_len=32, num_threads=2)
            d.prefill([1, 2, 3])
            del d

    cycle_decoders(20)  # warm-up: allocator pools, thread stacks
    before = rss_mb()
    cycle_decoders(200)
    after_decoders = rss_mb()
    decoder = ffnskip_ext.Decoder(config, weights, max_seq_len=32)
    decoder.set_policy(ffnskip_ext.FFNSkipPolicy(threshold=0.5, warmup_tokens=0))
    for _ in range(500):
        decoder.prefill([1, 2, 3])
        decoder.step(4)
        decoder.reset()
    middle = rss_mb()
    for _ in range(10_000):
        decoder.prefill([1, 2, 3])
        decoder.step(4)
        decoder.reset()
    after_cycles = rss_mb()
    assert after_decoders - before < 8, (before, after_decoders)
    assert after_cycles - middle < 4, (middle, after_cycles)


def test_decoders_in_threads_match_sequential_results(tiny_model_dir) -> None:
    _, path = tiny_model_dir("llama_gqa_untied_h72")
    config, weights = ffnskip_ext.load_checkpoint(path)
    prompts = [[i, i + 1, i + 2] for i in range(1, 5)]

    def run(decoder: ffnskip_ext.Decoder, prompt: list[int]) -> np.ndarray:
        decoder.reset()
        logits = decoder.prefill(prompt)
        steps = [logits]
        for _ in range(20):
            steps.append(decoder.step(int(np.argmax(steps[-1]))))
        return np.array(steps)

    decoders = [ffnskip_ext.Decoder(config, weights, max_seq_len=64) for _ in prompts]
    expected = [run(d, p) for d, p in zip(decoders, prompts, strict=True)]
    results: list[np.ndarray | None] = [None] * len(prompts)

    def worker(i: int) -> None:
        for _ in range(3):
            results[i] = run(decoders[i], prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_one_decoder_shared_by_two_threads_serialises(tiny_model_dir) -> None:
    _, path = tiny_model_dir("llama_mha_tied")
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=512)
    decoder.prefill([1])
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for i in range(200):
                assert np.isfinite(decoder.step(i % 200)).all()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert decoder.position == 1 + 400  # every step landed exactly once


class Interrupt(KeyboardInterrupt):
    pass


def test_interrupted_generation_leaves_the_decoder_consistent(tiny_model_dir) -> None:
    from test_generate import ByteTokenizer

    _, path = tiny_model_dir("llama_gqa_untied_h72")
    decoder = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=64)
    tokenizer = ByteTokenizer()
    expected = ffnskip_ext.generate(decoder, tokenizer, "abc", max_new_tokens=12)
    pieces: list[str] = []

    def stream(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            raise Interrupt

    with pytest.raises(KeyboardInterrupt):
        ffnskip_ext.generate(decoder, tokenizer, "abc", max_new_tokens=12, stream=stream)
    # Tokens in the cache: the prompt plus every generated token fed back before the stop.
    assert 3 <= decoder.position <= 3 + 12
    logits = decoder.step(1)
    assert np.isfinite(logits).all()
    again = ffnskip_ext.generate(decoder, tokenizer, "abc", max_new_tokens=12)
    assert again.token_ids == expected.token_ids


class NoEosByteTokenizer:
    """Token id = byte value + 1, no end of sequence: generations run to max_new_tokens."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i - 1 for i in ids if i > 0).decode(errors="replace")


def test_generations_from_several_threads_each_own_the_decoder() -> None:
    """Concurrent generate() calls on one decoder, and reset()/set_policy() from another
    thread, wait for the running generation instead of interleaving with it."""
    decoder = random_decoder(num_layers=3, max_seq_len=128)
    tokenizer = NoEosByteTokenizer()
    prompts = ["alpha", "beta gamma", "delta epsilon zeta"]
    expected = {p: ffnskip_ext.generate(decoder, tokenizer, p, max_new_tokens=40).token_ids
                for p in prompts}
    errors: list[BaseException] = []
    done = threading.Event()

    def generations(prompt: str) -> None:
        try:
            for _ in range(6):
                got = ffnskip_ext.generate(decoder, tokenizer, prompt, max_new_tokens=40)
                assert got.token_ids == expected[prompt]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def meddle() -> None:
        while not done.is_set():
            decoder.reset()
            decoder.set_policy(ffnskip_ext.DensePolicy())
            decoder.enable_trace(False)

    workers = [threading.Thread(target=generations, args=(p,)) for p in prompts]
    meddler = threading.Thread(target=meddle)
    meddler.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    done.set()
    meddler.join()
    assert not errors, errors[0]


def test_chat_sessions_on_one_decoder_from_several_threads() -> None:
    decoder = random_decoder(num_layers=2, max_seq_len=256)
    session = ffnskip_ext.ChatSession(decoder, NoEosByteTokenizer())
    prompts = ["one two", "three four five"]
    fresh = ffnskip_ext.ChatSession(random_decoder(num_layers=2, max_seq_len=256),
                                    NoEosByteTokenizer())
    expected = {p: fresh.generate(p, max_new_tokens=30).token_ids for p in prompts}
    errors: list[BaseException] = []

    def turns(prompt: str) -> None:
        try:
            for _ in range(5):
                assert session.generate(prompt, max_new_tokens=30).token_ids == expected[prompt]
                session.reset()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=turns, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("call", ["stats", "position", "trace", "enable_trace", "reset_stats"])
def test_waiting_for_the_engine_releases_the_gil(call: str) -> None:
    """A call that waits for another thread's prefill must let the interpreter run."""
    decoder, prompt = slow_prefill_decoder()
    prefilling, calling = threading.Event(), threading.Event()
    prefill_seconds: list[float] = []

    def prefill() -> None:
        prefilling.set()
        start = time.perf_counter()
        decoder.prefill(prompt)
        prefill_seconds.append(time.perf_counter() - start)

    def waiting_call() -> None:
        calling.set()
        if call == "position":
            _ = decoder.position
        elif call == "enable_trace":
            decoder.enable_trace(True)
        else:
            getattr(decoder, call)()

    worker = threading.Thread(target=prefill)
    worker.start()
    prefilling.wait()
    time.sleep(0.1)  # the prefill holds the engine now
    waiter = threading.Thread(target=waiting_call)
    waiter.start()
    calling.wait()
    ticks = 0
    start = time.perf_counter()
    while worker.is_alive() and time.perf_counter() - start < 0.5:
        time.sleep(0.01)
        ticks += 1
    still_prefilling = worker.is_alive()
    worker.join()
    waiter.join()
    assert prefill_seconds[0] > 0.8, "the prefill was too short to tell"
    assert still_prefilling, "the interpreter stood still until the prefill ended"
    assert ticks >= 10, f"the interpreter ran {ticks} times in 0.5 s"


def run_script(script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Runs `script` in a fresh interpreter that imports the tests' helpers; on a timeout its
    whole process group goes, forked children included (a hung child would spin on)."""
    tests_dir = str(Path(__file__).parent)
    process = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {tests_dir!r})\n" + script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


FORK_SCRIPT = """
import multiprocessing, os
import numpy as np
from random_models import random_decoder

decoder = random_decoder(num_layers=2, num_threads=2)
expected = decoder.prefill(list(range(1, 60)))

def child_logits(_):
    decoder.reset()
    return decoder.prefill(list(range(1, 60)))

pid = os.fork()
if pid == 0:
    ok = np.array_equal(child_logits(0), expected)
    del decoder  # the parent's workers are not joined in the child
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
with multiprocessing.get_context("fork").Pool(2) as pool:
    for got in pool.map(child_logits, range(4)):
        np.testing.assert_array_equal(got, expected)
print("ok")
"""


def test_forked_children_decode_after_the_parent_ran_threads() -> None:
    done = run_script(FORK_SCRIPT, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


THREAD_LIMIT_SCRIPT = """
import resource
from random_models import random_decoder

random_decoder(num_threads=2)  # the interpreter, NumPy and the engine are loaded
# Room for the decoder's buffers but not for 63 thread stacks of 8 MiB.
with open("/proc/self/statm") as f:
    used = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (96 << 20), resource.RLIM_INFINITY))
try:
    random_decoder(num_threads=64)
except RuntimeError as e:
    print("refused:", e)
else:
    print("started")
"""


def test_failing_to_start_threads_raises() -> None:
    done = run_script(THREAD_LIMIT_SCRIPT, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: cannot start 63 worker threads" in done.stdout, done.stdout


INTERRUPT_SCRIPT = """
import os, signal, threading, time
import numpy as np
from random_models import slow_prefill_decoder

decoder, prompt = slow_prefill_decoder()
decoder.prefill([1, 2, 3])
start = time.perf_counter()
threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
try:
    decoder.prefill(prompt)
except KeyboardInterrupt:
    print(f"interrupted after {time.perf_counter() - start:.2f} s")
assert decoder.position == 3, decoder.position
start = time.perf_counter()
logits = decoder.prefill(prompt)
full = time.perf_counter() - start
fresh, _ = slow_prefill_decoder()
fresh.prefill([1, 2, 3])
np.testing.assert_array_equal(logits, fresh.prefill(prompt))
print(f"full prefill {full:.2f} s")
"""


@pytest.mark.usefixtures("sigint_reaches_children")
def test_ctrl_c_stops_a_long_prefill_and_keeps_the_cache() -> None:
    done = run_script(INTERRUPT_SCRIPT, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.rsplit(" ", 2)[0:2] for line in done.stdout.splitlines())
    interrupted_after, full = float(lines["interrupted after"]), float(lines["full prefill"])
    assert full > 0.8, "the prefill was too short to tell"
    assert interrupted_after < 0.3 + 0.5 * full, done.stdout
