"""CPU decode and prefill speed of ffnskip_ext, HF transformers and llama.cpp, in one run.

The engines run the same weights, with the same number of threads, on the same token ids (the
chat prompt below, tokenized once). With --dtype auto (the default) ffnskip_ext and llama.cpp
both read the file as it is stored (GGUF block formats included: what users run), and each
engine is also loaded once in a process of its own to measure load time and peak RSS.
--model takes a path or a name of `ffnskip models list` (default: SmolLM2-135M-Instruct Q4_1).

With --dtype float32|bfloat16|float16 the three engines run the checkpoint dequantised and
stored at that precision:

- ffnskip_ext: ``Decoder`` on the checkpoint's weights, stored in --dtype;
- transformers: ``AutoModelForCausalLM.from_config`` (eager attention, dynamic KV cache)
  filled with the state dict of our loader, i.e. the same dequantised weights cast to --dtype,
  and checked to hold only plain dense ``nn.Linear`` layers in that dtype;
- llama.cpp (``llama-cpp-python``, optional; see benchmarks/README.md for the source build):
  a GGUF that this script writes from the source GGUF's tensors, dequantised and stored in
  F32, F16 or BF16 (1-D tensors such as norms stay F32, as llama.cpp's converter writes them),
  with the source's metadata (hyper-parameters, tokenizer). The script checks that it holds
  the same values as our loader's weights (with llama.cpp's Q/K row order). Its KV cache is
  F16 (llama.cpp's default; ours is fp32): --llamacpp-kv f32 makes fp32 logits agree to ~1e-4.

Decode: greedy, one token at a time after the prompt; the prefill is outside the timed loop.
--decode-context N puts N tokens of filler text before the chat prompt, so that each decode
step also reads a KV cache of that many positions (its bytes are not in the MB/token column).
Prefill: one pass over --prefill-tokens tokens from an empty cache. Rounds alternate between
the engines so that machine noise hits all of them; medians are reported.
Bytes per decode token: every weight matrix (q, k, v, o, gate, up, down of every layer and the
LM head, which SmolLM2 ties to the embedding) in --dtype plus the norm vectors in fp32.
Read bandwidth: ``ffnskip_ext.measure_read_bandwidth``, --threads threads streaming their shares
of a 1 GiB buffer through the CPU kernels' vector loads, best of 5 passes, probed before every
round of the run; the table divides by the best probe (this machine's bandwidth drifts by
+-20% within minutes, so one probe can read below what a decode round then reaches).

    python benchmarks/bench_cpu_compare.py [--dtype auto|float32|bfloat16|float16] [--threads N]
        [--tokens 64] [--rounds 3] [--prefill-tokens 512] [--decode-context 0] [--model PATH|NAME]
        [--engines ffnskip,hf,llamacpp] [--llamacpp-kv f16|f32|bf16]
        [--kv-cache-dtype auto|float16] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import gguf
import numpy as np

import ffnskip_ext
from ffnskip_ext.config import ModelConfig
from ffnskip_ext.loaders import open_checkpoint
from ffnskip_ext.loaders.models import resolve_model

PROMPT = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]
FILLER = (
    "The lighthouse stood on a rock at the edge of the bay, and every night its keeper climbed "
    "the spiral stairs to light the lamp, wind the clockwork and polish the great lens. "
)
ENGINES = ("ffnskip", "hf", "llamacpp")
DTYPES = ("auto", "float32", "bfloat16", "float16")
GGUF_TYPES = {
    "float32": gguf.GGMLQuantizationType.F32,
    "float16": gguf.GGMLQuantizationType.F16,
    "bfloat16": gguf.GGMLQuantizationType.BF16,
}
GGUF_FILE_TYPES = {
    "float32": gguf.LlamaFileType.ALL_F32,
    "float16": gguf.LlamaFileType.MOSTLY_F16,
    "bfloat16": gguf.LlamaFileType.MOSTLY_BF16,
}
# Written by GGUFWriter itself, or describing the source's quantisation.
SKIPPED_KEYS = {
    gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE,
    gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.ALIGNMENT,
}
AGREEMENT_TOKENS = 16
WARMUP_TOKENS = 4


class Engine(Protocol):
    name: str
    detail: str  # how it runs, printed before the results

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Empty the cache, process ``ids``; float32 logits of the last one."""

    def step(self, token: int) -> int:
        """Append one token; the greedy next token."""


# --------------------------------------------------------------------------- engines


class FfnskipEngine:
    name = "ffnskip_ext"

    def __init__(self, decoder: ffnskip_ext.Decoder) -> None:
        self.decoder = decoder
        types = ", ".join(f"{t} {n / 1e6:.0f} MB" for t, n in sorted(decoder.weight_bytes.items()))
        self.detail = (f"Decoder, {decoder.dtype} weights ({types}), KV cache "
                       f"{decoder.kv_cache_dtype}")

    @classmethod
    def load(cls, path: str, dtype: str, threads: int, n_ctx: int,
             kv_cache_dtype: str) -> FfnskipEngine:
        """As a user loads it: the file mapped, tensors in place or converted to ``dtype``."""
        return cls(ffnskip_ext.Decoder.from_pretrained(
            path, dtype=dtype, max_seq_len=n_ctx, num_threads=threads,
            kv_cache_dtype=kv_cache_dtype))

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        self.decoder.reset()
        return self.decoder.prefill(ids)

    def step(self, token: int) -> int:
        return int(np.argmax(self.decoder.step(token)))


class TransformersEngine:
    name = "transformers"

    def __init__(
        self, path: str, weights: dict[str, np.ndarray], dtype: str, threads: int
    ) -> None:
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.torch_dtype = getattr(torch, dtype)
        if os.path.isdir(path):
            hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        else:
            hf_config = transformers.AutoConfig.from_pretrained(
                os.path.dirname(path) or ".", gguf_file=os.path.basename(path)
            )
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config, dtype=self.torch_dtype, attn_implementation="eager"
        )
        self.model = _load_dense_state(model, weights, self.torch_dtype).eval()
        self.detail = _check_dense(self.model, self.torch_dtype)
        self.cache: Any = None

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(self.torch.tensor([list(ids)]), use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[0, -1].float().numpy()

    def step(self, token: int) -> int:
        with self.torch.inference_mode():
            out = self.model(
                self.torch.tensor([[token]]), past_key_values=self.cache, use_cache=True
            )
            self.cache = out.past_key_values
            return int(out.logits[0, -1].argmax())


def _load_dense_state(model: Any, weights: dict[str, np.ndarray], torch_dtype: Any) -> Any:
    """Copy our loader's weights into ``model``; only a tied LM head may be missing."""
    import torch

    state = {name: torch.from_numpy(w).to(torch_dtype) for name, w in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model


def _check_dense(model: Any, torch_dtype: Any) -> str:
    """Fail unless every parameter is ``torch_dtype`` and every linear a plain nn.Linear."""
    import torch

    if getattr(model.config, "quantization_config", None) or getattr(model, "hf_quantizer", None):
        raise RuntimeError("transformers model is quantised")
    dtypes = {p.dtype for p in model.parameters()}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if dtypes != {torch_dtype} or any(type(m) is not torch.nn.Linear for m in linears):
        raise RuntimeError(f"transformers model is not dense {torch_dtype}: {dtypes}")
    return f"{len(linears)} dense nn.Linear, all parameters {str(torch_dtype)[6:]}, eager"


class LlamaCppEngine:
    name = "llama.cpp"

    def __init__(self, gguf_path: str, threads: int, n_ctx: int, kv_type: str) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        kv = getattr(llama_cpp, f"GGML_TYPE_{kv_type.upper()}")
        self.llm = llama_cpp.Llama(
            model_path=gguf_path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
            n_batch=512, verbose=False, logits_all=False, type_k=kv, type_v=kv,
        )
        self.n_vocab = self.llm.n_vocab()
        self.detail = (f"llama-cpp-python {llama_cpp.__version__}, "
                       f"{os.path.basename(gguf_path)}, KV cache {kv_type.upper()}")

    def _logits(self) -> np.ndarray:
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(ids))
        return self._logits().copy()

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return int(np.argmax(self._logits()))

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)


# --------------------------------------------------------------------------- GGUF for llama.cpp


def dense_gguf_path(source: str, dtype: str, cache_dir: str) -> str:
    """The source GGUF's weights in ``dtype``, written once into ``cache_dir``."""
    stem = os.path.basename(source).removesuffix(".gguf")
    path = os.path.join(cache_dir, f"{stem}.{GGUF_TYPES[dtype].name}.gguf")
    if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(source):
        os.makedirs(cache_dir, exist_ok=True)
        write_dense_gguf(source, path + ".tmp", dtype)
        os.replace(path + ".tmp", path)
    return path


def write_dense_gguf(source: str, path: str, dtype: str) -> None:
    """Copy ``source`` with every tensor dequantised, 2-D ones stored in ``dtype``."""
    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(path, arch, use_temp_file=True)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in SKIPPED_KEYS:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
    writer.add_file_type(GGUF_FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor in reader.tensors:
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        qtype = GGUF_TYPES[dtype] if w.ndim == 2 else gguf.GGMLQuantizationType.F32
        writer.add_tensor(tensor.name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> GGUF row order of Q/K (convert_hf_to_gguf's ``LlamaModel.permute``)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_same_weights(
    path: str, config: ModelConfig, weights: dict[str, np.ndarray], dtype: str
) -> str:
    """Compare every tensor of the written GGUF with our loader's (rounded to ``dtype``)."""
    from ffnskip_ext.loaders.gguf import gguf_name  # HF name -> GGUF name

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    types: dict[str, int] = {}
    for name, w in weights.items():
        tensor = tensors[gguf_name(name)]
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
        ours = gguf.quants.dequantize(gguf.quants.quantize(w, tensor.tensor_type),
                                      tensor.tensor_type)
        if config.architecture == "llama" and ".self_attn.q_proj." in name:
            ours = llama_cpp_permute(ours, config.num_heads)
        elif config.architecture == "llama" and ".self_attn.k_proj." in name:
            ours = llama_cpp_permute(ours, config.num_kv_heads)
        theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(ours.shape)
        if not np.array_equal(ours, theirs):
            raise RuntimeError(f"{path}: {tensor.name} differs from our loader's {name}")
    counts = ", ".join(f"{n} {t}" for t, n in sorted(types.items()))
    return f"{len(weights)} tensors ({counts}) identical to ours"


# --------------------------------------------------------------------------- measurements


def weight_bytes_per_token(config: ModelConfig, dtype: str) -> int:
    """Bytes of weights one decode step reads: matrices in ``dtype``, vectors in fp32."""
    from ffnskip_ext.loaders import expected_shapes

    itemsize = 4 if dtype == "float32" else 2
    total = 0
    for name, shape in expected_shapes(config).items():
        if name == "model.embed_tokens.weight":
            if not config.tie_word_embeddings:
                continue  # a row lookup; the untied LM head is counted as lm_head.weight
            total += math.prod(shape) * itemsize  # the tied LM head
        else:
            total += math.prod(shape) * (itemsize if len(shape) == 2 else 4)
    return total


def greedy(engine: Engine, prompt: Sequence[int], tokens: int) -> list[int]:
    out = [int(np.argmax(engine.prefill(prompt)))]
    while len(out) < tokens:
        out.append(engine.step(out[-1]))
    return out


def decode_rate(engine: Engine, prompt: Sequence[int], tokens: int) -> float:
    token = int(np.argmax(engine.prefill(prompt)))
    start = time.perf_counter()
    for _ in range(tokens):
        token = engine.step(token)
    return tokens / (time.perf_counter() - start)


def prefill_rate(engine: Engine, ids: Sequence[int]) -> float:
    start = time.perf_counter()
    engine.prefill(ids)
    return len(ids) / (time.perf_counter() - start)


def interleaved(
    engines: Sequence[Engine], rounds: int, measure: Callable[[Engine], float],
    before_round: Callable[[], object],
) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {e.name: [] for e in engines}
    for i in range(rounds):
        before_round()
        for engine in engines if i % 2 == 0 else engines[::-1]:  # no engine always goes first
            time.sleep(0.2)  # let the previous engine's spinning threads go to sleep
            rates[engine.name].append(measure(engine))
    return rates


# --------------------------------------------------------------------------- report


class Report:
    """Prints lines and keeps them for --out."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def agreement(
    report: Report, engines: Sequence[Engine], prompt: Sequence[int], tokenizer: Any
) -> None:
    """Greedy continuations of the prompt, and first-token logits, against the first engine."""
    ref = engines[0]
    ref_logits = ref.prefill(prompt)
    ref_ids = greedy(ref, prompt, AGREEMENT_TOKENS)
    report(f"greedy continuation ({AGREEMENT_TOKENS} tokens), {ref.name}: "
           f"{tokenizer.decode(ref_ids)!r}")
    for engine in engines[1:]:
        ids = greedy(engine, prompt, AGREEMENT_TOKENS)
        equal = [a == b for a, b in zip(ids, ref_ids, strict=True)]
        same, lead = sum(equal), equal.index(False) if False in equal else len(equal)
        diff = float(np.max(np.abs(engine.prefill(prompt) - ref_logits)))
        report(f"  {engine.name}: {same}/{AGREEMENT_TOKENS} tokens agree with {ref.name} "
               f"(identical prefix {lead}), max |logit diff| after the prompt {diff:.2e}")
        if lead < AGREEMENT_TOKENS:
            report(f"    {engine.name}'s continuation: {tokenizer.decode(ids)!r}")


def loaded_rss(load: dict[str, float]) -> float:
    """Peak RSS of a load probe above what the process held before loading."""
    return load["peak_rss"] - load["base_rss"]


def print_table(
    report: Report, engines: Sequence[Engine], decode: dict[str, list[float]],
    prefill: dict[str, list[float]], bytes_per_token: int, bandwidth: float,
    loads: dict[str, dict[str, float]],
) -> None:
    report(f"{'engine':<14}{'decode tok/s':>13}{'MB/token':>10}{'GB/s':>7}{'of read BW':>11}"
           f"{'prefill tok/s':>15}{'load s':>8}{'peak RSS MB':>13}"
           "   decode rounds / prefill rounds")
    for e in engines:
        tok_s, pre = statistics.median(decode[e.name]), statistics.median(prefill[e.name])
        gb_s = bytes_per_token * tok_s / 1e9
        rounds = f"{[round(x, 1) for x in decode[e.name]]} / {[round(x) for x in prefill[e.name]]}"
        load = loads.get(e.name)
        load_cols = (f"{load['load_s']:>8.2f}{loaded_rss(load) / 1e6:>13.0f}"
                     if load else f"{'-':>8}{'-':>13}")
        report(f"{e.name:<14}{tok_s:>13.2f}{bytes_per_token / 1e6:>10.1f}{gb_s:>7.2f}"
               f"{gb_s * 1e9 / bandwidth:>11.1%}{pre:>15.1f}{load_cols}   {rounds}")
    for name, load in loads.items():
        report(f"{name} load probe (own process): load {load['load_s']:.2f} s"
               + f", RSS {load['base_rss'] / 1e6:.0f} MB before loading (interpreter, imports),"
               f" peak {load['peak_rss'] / 1e6:.0f} MB after decoding {WARMUP_TOKENS} tokens"
               + (f"; then the tokenizer (transformers): {load['tokenizer_s']:.2f} s, peak RSS "
                  f"+{load['tokenizer_rss'] / 1e6:.0f} MB" if load["tokenizer_s"] else ""))
    ours = FfnskipEngine.name
    if ours not in decode:
        report(f"ratios: none ({ours} did not run)")
        return
    for other in (LlamaCppEngine.name, TransformersEngine.name):
        if other in decode:
            line = (f"ratio {ours} / {other}: decode "
                    f"{statistics.median(decode[ours]) / statistics.median(decode[other]):.2f}x, "
                    f"prefill "
                    f"{statistics.median(prefill[ours]) / statistics.median(prefill[other]):.2f}x")
            if ours in loads and other in loads:
                a, b = loads[ours], loads[other]
                line += (f", load time {a['load_s'] / b['load_s']:.2f}x, "
                         f"peak RSS {loaded_rss(a) / loaded_rss(b):.2f}x")
            report(line)


def machine_description(threads: int) -> list[str]:
    cpu, flags = platform.processor() or platform.machine(), set()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    with open("/proc/meminfo", encoding="utf-8") as f:
        mem_kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16")
           if f in flags]
    lines = [
        f"machine: {cpu}, {os.cpu_count()} cpus, {mem_kib / 2**20:.1f} GiB, ISA "
        f"{' '.join(isa) or 'none of avx2/avx512'}; threads={threads}",
        f"ffnskip_ext CPU kernels: {ffnskip_ext.build_info()['cpu_isa']}, quantised dot "
        f"products {ffnskip_ext.build_info()['cpu_quant_kernels']} "
        f"(FFNSKIP_CPU_ISA={os.environ.get('FFNSKIP_CPU_ISA', 'unset')})",
        f"versions: {versions()}; commit {commit()}",
    ]
    if (llama_cpp := sys.modules.get("llama_cpp")) is not None:
        lines.append(f"llama.cpp build: {llama_cpp.llama_print_system_info().decode().strip()}")
    return lines


def versions() -> str:
    out = [f"python {platform.python_version()}", f"numpy {np.__version__}",
           f"gguf {_version('gguf')}"]
    for name in ("torch", "transformers", "llama_cpp"):
        if (module := sys.modules.get(name)) is not None:  # imported by an engine
            out.append(f"{name} {module.__version__}")
    return ", ".join(out)


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True,
            text=True, check=False,
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" (working tree modified)" if git("status", "--porcelain") else "")


def write_markdown(path: str, report: Report) -> None:
    argv = [a for i, a in enumerate(sys.argv)
            if not a.startswith("--out") and (i == 0 or sys.argv[i - 1] != "--out")]
    command = "python " + " ".join(shlex.quote(a) for a in argv)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"\n## {command}\n\n{datetime.date.today()}\n\n```\n")
        f.write("\n".join(report.lines) + "\n```\n")


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="HF directory, .gguf, or a model name (default SmolLM2)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="auto: each engine reads the file as stored; else convert")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=64, help="decode tokens per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-context", type=int, default=0,
                        help="tokens of filler before the prompt of the decode rounds")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma-separated subset of {','.join(ENGINES)}")
    parser.add_argument("--llamacpp-kv", default="f16", choices=["f16", "f32", "bf16"],
                        help="llama.cpp's KV cache type (its default: f16)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float16"],
                        help="ffnskip_ext's KV cache (auto: float32 on the CPU)")
    parser.add_argument("--out", default=None, help="append the report to this markdown file")
    parser.add_argument("--cache-dir", default=os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ffnskip_ext", "bench"
    ), help="where the dense GGUF for llama.cpp is written (reused while newer than the source)")
    parser.add_argument("--load-probe", choices=["ffnskip", "llamacpp"], help=argparse.SUPPRESS)
    parser.add_argument("--n-ctx", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engines) - set(ENGINES)
    if unknown or not args.engines:
        parser.error(f"--engines: unknown {sorted(unknown)}; choose from {','.join(ENGINES)}")
    return args


def build_engines(
    args: argparse.Namespace, path: str, config: ModelConfig,
    weights: dict[str, np.ndarray] | None, n_ctx: int, report: Report,
) -> list[Engine]:
    """The engines of --engines; `weights` (our loader's fp32 arrays) only for a float
    --dtype, where transformers and llama.cpp get them converted."""
    engines: list[Engine] = []
    if "ffnskip" in args.engines:
        try:
            engines.append(FfnskipEngine.load(path, args.dtype, args.threads, n_ctx,
                                              args.kv_cache_dtype))
        except ValueError as e:
            report(f"skipping ffnskip_ext: {e}")
    if "hf" in args.engines:
        if weights is None:
            report("skipping transformers: it has no CPU kernels for GGUF block formats "
                   "(it dequantises on load); compare it with --dtype float32")
        else:
            try:
                engines.append(TransformersEngine(path, weights, args.dtype, args.threads))
            except ImportError as e:
                report(f"skipping transformers: {e} (pip install torch transformers)")
    if "llamacpp" in args.engines and (gguf_path := llama_cpp_gguf(args, path, config,
                                                                   weights, report)):
        engines.append(LlamaCppEngine(gguf_path, args.threads, n_ctx, args.llamacpp_kv))
    return engines


def llama_cpp_gguf(
    args: argparse.Namespace, path: str, config: ModelConfig,
    weights: dict[str, np.ndarray] | None, report: Report,
) -> str | None:
    """The file llama.cpp reads: the model's own GGUF (--dtype auto) or a copy converted to
    --dtype, checked to hold our loader's weights."""
    if os.path.isdir(path):
        report("skipping llama.cpp: it needs a .gguf source (for its tokenizer metadata)")
        return None
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        report("skipping llama.cpp: llama-cpp-python is not installed "
               "(pip install '.[bench]', built from source: see benchmarks/README.md)")
        return None
    if weights is None:
        return path
    gguf_path = dense_gguf_path(path, args.dtype, args.cache_dir)
    report(f"llama.cpp weights: {gguf_path}: "
           f"{check_same_weights(gguf_path, config, weights, args.dtype)}")
    return gguf_path


# --------------------------------------------------------------------------- load probes


def rss_bytes(key: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process."""
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def load_probe(args: argparse.Namespace, path: str, n_ctx: int) -> dict[str, float]:
    """In a fresh process (the --load-probe child): load one engine as a user would, decode a
    few tokens so that every weight has been read, and report the load time and the peak RSS
    (the interpreter and imports measured before loading, and subtracted); for ffnskip_ext
    then its tokenizer's load time and RSS (llama.cpp's is inside its model load)."""
    ids = list(range(1, 17))
    if args.load_probe == "llamacpp":
        import llama_cpp  # noqa: F401  (imported before the baseline)
    base = rss_bytes("VmRSS")
    start = time.perf_counter()
    engine: Engine = (
        FfnskipEngine.load(path, args.dtype, args.threads, n_ctx, args.kv_cache_dtype)
        if args.load_probe == "ffnskip"
        else LlamaCppEngine(llama_cpp_path(args, path), args.threads, n_ctx, args.llamacpp_kv))
    load = time.perf_counter() - start
    token = int(np.argmax(engine.prefill(ids)))
    for _ in range(WARMUP_TOKENS):
        token = engine.step(token)
    out = {"load_s": load, "tokenizer_s": 0.0, "base_rss": base,
           "peak_rss": rss_bytes("VmHWM"), "tokenizer_rss": 0}
    if args.load_probe == "ffnskip":  # llama.cpp loaded its tokenizer inside the model
        start = time.perf_counter()
        ffnskip_ext.load_tokenizer(path)
        out["tokenizer_s"] = time.perf_counter() - start
        out["tokenizer_rss"] = rss_bytes("VmHWM") - out["peak_rss"]
    return out


def llama_cpp_path(args: argparse.Namespace, path: str) -> str:
    return path if args.dtype == "auto" else dense_gguf_path(path, args.dtype, args.cache_dir)


def probe_loads(args: argparse.Namespace, path: str, n_ctx: int,
                engines: Sequence[Engine]) -> dict[str, dict[str, float]]:
    """{engine name: load_probe of a child process}, ffnskip_ext and llama.cpp only."""
    names = {FfnskipEngine.name: "ffnskip", LlamaCppEngine.name: "llamacpp"}
    out = {}
    for e in engines:
        if e.name not in names:
            continue
        command = [sys.executable, os.path.abspath(__file__), "--load-probe", names[e.name],
                   "--model", path, "--dtype", args.dtype, "--threads", str(args.threads),
                   "--llamacpp-kv", args.llamacpp_kv, "--kv-cache-dtype", args.kv_cache_dtype,
                   "--cache-dir", args.cache_dir,
                   "--n-ctx", str(n_ctx)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        out[e.name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def prefill_ids(tokenizer: Any, count: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < count:
        ids += tokenizer.encode(FILLER * 8, add_special_tokens=False)
    return ids[:count]


def main() -> None:
    args = parse_args()
    path = resolve_model(args.model)
    if args.load_probe:
        print(json.dumps(load_probe(args, path, args.n_ctx)))
        return
    report = Report()
    tokenizer = ffnskip_ext.load_tokenizer(path)
    prompt = ffnskip_ext.encode_prompt(tokenizer, PROMPT)
    long_prompt = prefill_ids(tokenizer, args.prefill_tokens)
    decode_prompt = prefill_ids(tokenizer, args.decode_context) + prompt
    n_ctx = max(args.prefill_tokens, len(decode_prompt) + max(args.tokens, AGREEMENT_TOKENS)) + 16
    if args.dtype == "auto":
        config, weights = open_checkpoint(path)[0], None
    else:
        config, weights = ffnskip_ext.load_checkpoint(path)

    engines = build_engines(args, path, config, weights, n_ctx, report)
    del weights
    if not engines:
        sys.exit("no engine to run")
    for e in engines:
        report(f"{e.name}: {e.detail}")
    for e in engines:
        if isinstance(e, LlamaCppEngine):
            text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True,
                                                 tokenize=False)
            report(f"llama.cpp tokenizes the prompt text identically: {e.tokenize(text) == prompt}")

    agreement(report, engines, prompt, tokenizer)
    for e in engines:  # warm-up: page in weights, wake threads, pick kernels
        decode_rate(e, decode_prompt, WARMUP_TOKENS)
        prefill_rate(e, long_prompt)
    probes: list[float] = []

    def probe() -> None:
        probes.append(ffnskip_ext.measure_read_bandwidth(1 << 30, args.threads, 5))

    decode = interleaved(engines, args.rounds,
                         lambda e: decode_rate(e, decode_prompt, args.tokens), probe)
    prefill = interleaved(engines, args.rounds, lambda e: prefill_rate(e, long_prompt), probe)
    bandwidth = max(probes)
    loads = probe_loads(args, path, n_ctx, engines)

    for line in machine_description(args.threads):
        report(line)
    report(f"model: {os.path.basename(path)} ({args.dtype} weights), prompt {len(prompt)} tokens "
           f"after {args.decode_context} tokens of context, {args.tokens} decode tokens x "
           f"{args.rounds} rounds, prefill {len(long_prompt)} tokens x {args.rounds} rounds")
    report(f"read bandwidth ({args.threads} threads, vector sum over 1 GiB, best of 5 passes, "
           f"probed before each round): best {bandwidth / 1e9:.1f} GB/s, probes "
           f"{[round(b / 1e9, 1) for b in probes]}")
    ours = next((e for e in engines if isinstance(e, FfnskipEngine)), None)
    bytes_per_token = (ours.decoder.dense_step_bytes if args.dtype == "auto" and ours
                       else weight_bytes_per_token(config, args.dtype))
    print_table(report, engines, decode, prefill, bytes_per_token, bandwidth, loads)
    if args.out:
        write_markdown(args.out, report)


if __name__ == "__main__":
    main()
