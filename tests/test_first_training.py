"""FiRST routers: the router file, the hard-gated PyTorch reference and router training."""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import hf_logits
from ffnskip_ext.cli import main
from ffnskip_ext.runtime.routers import (
    ROUTER_FORMAT,
    Routers,
    default_router_path,
    load_routers,
)
from ffnskip_ext.training.first import read_examples, reference_decisions, train_routers

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: a second thread only adds synchronisation (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_routers(layers: int = 3, hidden: int = 8, seed: int = 0) -> Routers:
    rng = np.random.default_rng(seed)
    return Routers(rng.standard_normal((layers, hidden)), rng.standard_normal(layers),
                   metadata={"model": "tiny", "trained_on": "nothing"})


def _write(path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


# --------------------------------------------------------------------------- router file


def test_router_file_round_trip(tmp_path) -> None:
    routers = _random_routers()
    path = routers.save(tmp_path / "sub" / "r.safetensors")
    assert routers.path == path
    loaded = load_routers(path)
    assert loaded == routers and loaded.path == path
    assert loaded.weight.dtype == np.float32 and loaded.bias.dtype == np.float32
    assert np.array_equal(loaded.weight, routers.weight)
    assert loaded.metadata == {"format": ROUTER_FORMAT, "version": "1", "num_layers": "3",
                               "hidden_size": "8", "model": "tiny", "trained_on": "nothing"}
    assert (loaded.num_layers, loaded.hidden_size) == (3, 8)
    assert not loaded.weight.flags.writeable  # a policy's routers cannot change under it
    # Standard safetensors: other readers agree.
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = safetensors_numpy.load_file(path)
    assert np.array_equal(tensors["weight"], routers.weight)
    assert np.array_equal(tensors["bias"], routers.bias)


def test_routers_validate_their_arrays() -> None:
    with pytest.raises(ValueError, match="weight must have shape"):
        Routers(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="bias must have shape"):
        Routers(np.zeros((3, 4)), np.zeros(2))
    with pytest.raises(ValueError, match="NaN or infinite"):
        Routers(np.zeros((3, 4)), [0.0, np.inf, 0.0])
    with pytest.raises(ValueError, match="num_layers"):
        Routers(np.zeros((3, 4)), np.zeros(3), metadata={"num_layers": "5"})


def test_bad_router_files_fail_clearly(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="router file not found"):
        load_routers(tmp_path / "missing.safetensors")
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(ValueError, match="too short"):
        load_routers(short)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(ValueError, match="malformed"):
        load_routers(garbage)
    good = _random_routers()
    weight, bias = good.weight.tobytes(), good.bias.tobytes()
    tensors = {"bias": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
               "weight": {"dtype": "F32", "shape": [3, 8], "data_offsets": [12, 108]}}
    meta = dict(good.metadata)
    not_routers = tmp_path / "model.safetensors"
    _write(not_routers, tensors, bias + weight)
    with pytest.raises(ValueError, match="not a FiRST router file"):
        load_routers(not_routers)
    cases = {
        "version": ({"__metadata__": {**meta, "version": "2"}, **tensors}, "version '2'"),
        "shape": ({"__metadata__": {**meta, "num_layers": "4"}, **tensors}, "metadata says"),
        "extra": ({"__metadata__": meta, **tensors,
                   "x": {"dtype": "F32", "shape": [0], "data_offsets": [108, 108]}},
                  "expected tensors"),
        "dtype": ({"__metadata__": meta, **tensors,
                   "bias": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
                   "weight": {"dtype": "F32", "shape": [3, 8], "data_offsets": [6, 102]}},
                  "must be F32"),
    }
    for name, (header, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        _write(path, header, bias + weight)
        with pytest.raises(ValueError, match=message):
            load_routers(path)
    truncated = tmp_path / "truncated.safetensors"
    _write(truncated, {"__metadata__": meta, **tensors}, bias + weight[:-4])
    with pytest.raises(ValueError, match="outside"):
        load_routers(truncated)
    nan = tmp_path / "nan.safetensors"
    _write(nan, {"__metadata__": meta, **tensors},
           np.array([0, np.nan, 0], np.float32).tobytes() + weight)
    with pytest.raises(ValueError, match="NaN"):
        load_routers(nan)


def test_constant_routers_give_their_gates_for_any_input() -> None:
    gates = [0.0, 0.2, 0.5, 0.7, 1.0]
    routers = Routers.constant(5, 16, gates)
    features = np.random.default_rng(0).standard_normal((5, 16)) * 100
    out = routers.gates(features)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, gates, rtol=1e-6, atol=1e-12)
    assert out[2] == 0.5 and out[4] == 1.0
    assert np.array_equal(Routers.constant(3, 4, 0.9).gates(np.ones((3, 4))),
                          np.full(3, 0.9, np.float32))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        Routers.constant(2, 4, 1.5)


def test_default_router_path(tmp_path) -> None:
    assert default_router_path(tmp_path) == str(tmp_path / "first-routers.safetensors")
    gguf = "/m/SmolLM2.Q4_1.gguf"
    assert default_router_path(gguf) == "/m/SmolLM2.Q4_1.first-routers.safetensors"


# --------------------------------------------------------------------------- reference


@pytest.mark.parametrize("variant", ["llama_gqa_untied_h72", "qwen2_qkv_bias"])
def test_reference_with_every_layer_on_is_the_dense_model(tiny_model_dir, variant) -> None:
    model, _ = tiny_model_dir(variant)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    keep, gates, logits = reference_decisions(model, Routers.constant(layers, hidden, 1.0), PROMPT)
    assert keep.all() and np.array_equal(gates, np.ones(layers, np.float32))
    dense = hf_logits(model, PROMPT)[-1]
    assert np.abs(logits - dense).max() <= 1e-4 * np.abs(dense).max()


def test_reference_keeps_exactly_the_layers_at_or_above_the_threshold(tiny_model_dir) -> None:
    model, _ = tiny_model_dir("llama_gqa_untied_h72")
    routers = Routers.constant(3, 72, [0.9, 0.2, 0.5])
    keep, gates, logits = reference_decisions(model, routers, PROMPT, threshold=0.5)
    assert keep.tolist() == [True, False, True]
    np.testing.assert_allclose(gates, [0.9, 0.2, 0.5], rtol=1e-6)
    # The same as the dense model without layer 1 (the residual passes it unchanged).
    pruned = copy.deepcopy(model)
    pruned.model.layers = torch.nn.ModuleList([pruned.model.layers[i] for i in (0, 2)])
    pruned.config.num_hidden_layers = 2
    np.testing.assert_allclose(logits, hf_logits(pruned, PROMPT)[-1], rtol=1e-4, atol=1e-4)
    assert reference_decisions(model, routers, PROMPT, threshold=0.0)[0].all()
    assert not reference_decisions(model, routers, PROMPT, threshold=1.0)[0].any()
    assert reference_decisions(model, routers, PROMPT, threshold=0.95)[0].tolist() == [False] * 3


def test_reference_routes_on_the_hard_gated_stream(tiny_model_dir) -> None:
    """Layer 1's router reads the residual left by layer 0's decision."""
    model, _ = tiny_model_dir("llama_mha_tied")
    rng = np.random.default_rng(1)
    weight = np.zeros((2, 64), np.float32)
    weight[1] = rng.standard_normal(64)
    on = reference_decisions(model, Routers(weight, [5.0, 0.0]), PROMPT)[1]
    off = reference_decisions(model, Routers(weight, [-5.0, 0.0]), PROMPT)[1]
    assert on[1] != off[1]


# --------------------------------------------------------------------------- training

ROWS = [
    {"prompt": "count to five", "completion": "one two three four five"},
    {"prompt": "say hello", "completion": "hello hello hello"},
    {"text": "the quick brown fox jumps over the lazy dog. " * 3},
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("first_data") / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


def test_read_examples(tiny_chat_model_dir, data_file) -> None:
    from ffnskip_ext import load_tokenizer

    tokenizer = load_tokenizer(tiny_chat_model_dir)
    examples = read_examples(data_file, tokenizer, max_tokens=64)
    assert [e.kind for e in examples] == ["user"] * len(examples)
    first = examples[0]
    assert tokenizer.decode(list(first.prompt)) == "<|user|>count to five<|end|><|assistant|>"
    assert tokenizer.decode(list(first.target)) == "one two three four five<|end|>"
    text = examples[2:]  # 135 characters of byte-level tokens: windows of 64, cut in halves
    assert [(len(e.prompt), len(e.target)) for e in text] == [(32, 32), (32, 32), (3, 4)]
    assert all(len(e.prompt) + len(e.target) <= 64 for e in examples)


def test_training_lowers_the_loss(tiny_chat_model_dir, data_file, tmp_path) -> None:
    out = tmp_path / "routers.safetensors"
    routers = train_routers(tiny_chat_model_dir, data=data_file, epochs=8, lr=0.05,
                            max_tokens=64, batch_size=2, progress=False, out=out)
    assert routers.path == str(out) and load_routers(out) == routers
    assert (routers.num_layers, routers.hidden_size) == (8, 64)
    report = json.loads(routers.metadata["training"])
    history = report["history"]
    assert len(history) == 8 and history[-1]["loss"] < history[0]["loss"]
    assert report["kept"]["all"]["examples"] == report["settings"]["examples"]
    assert routers.metadata["trained_on"] == str(data_file)


def test_a_strong_penalty_turns_layers_off(tiny_chat_model_dir, data_file, tmp_path) -> None:
    routers = train_routers(tiny_chat_model_dir, data=data_file, epochs=6, lr=0.1,
                            max_tokens=64, penalty=20.0, progress=False,
                            out=tmp_path / "r.safetensors")
    history = json.loads(routers.metadata["training"])["history"]
    assert history[0]["mean_gate"] > 0.8
    assert history[-1]["mean_gate"] < 0.5
    assert json.loads(routers.metadata["training"])["kept"]["all"]["kept_layers"] < 8


def test_training_rejects_bad_data(tiny_chat_model_dir, tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        train_routers(tiny_chat_model_dir, data=bad, progress=False, out=tmp_path / "r")
    with pytest.raises(ValueError, match="epochs"):
        train_routers(tiny_chat_model_dir, data=bad, epochs=0, progress=False)


def test_cli_train_routers(tiny_chat_model_dir, data_file, tmp_path, capsys) -> None:
    out = tmp_path / "cli.safetensors"
    assert main(["train-routers", str(tiny_chat_model_dir), "--data", str(data_file),
                 "--epochs", "1", "--out", str(out), "--max-tokens", "64"]) == 0
    err = capsys.readouterr().err
    assert str(out) in err and "layers kept" in err
    assert load_routers(out).num_layers == 8
    assert main(["train-routers", str(tmp_path / "nope")]) == 2


def test_router_files_need_no_torch(tmp_path) -> None:
    path = _random_routers().save(tmp_path / "r.safetensors")
    script = ("import sys; sys.modules['torch'] = None\n"
              "from ffnskip_ext.runtime.routers import load_routers, Routers\n"
              f"r = load_routers({str(path)!r}); print(r.num_layers, r.hidden_size)\n"
              "Routers.constant(2, 4, 0.5)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["3", "8"]
