"""Mutation fuzzer for the checkpoint loaders (run as a script, in its own process).

    python fuzz_loaders.py MODEL_DIR GGUF_FILES WORK_DIR ITERATIONS SECONDS SEED

GGUF_FILES is a comma-separated list (say one float or Q8_0 file and one mixing block types);
outcomes are counted per kind: "st" and each GGUF file's stem.

Each iteration copies a valid file, mutates it (truncation, bit flips, edited header bytes,
overwritten lengths) and loads it both ways: as float32 arrays (load_checkpoint) and read in
place from the mapped file (Decoder.from_pretrained), then runs a prefill when the load
succeeds. Every outcome must be a clean load or a ValueError/FileNotFoundError; anything else
is printed as FAIL with the mutation and the process exits 1. A crash shows as the process
dying.
"""

from __future__ import annotations

import collections
import os
import random
import resource
import shutil
import struct
import sys
import time
import traceback

import ffnskip_ext

CLEAN_ERRORS = (ValueError, FileNotFoundError)


def mutate(data: bytearray, rng: random.Random, header_end: int) -> str:
    choice = rng.randrange(5)
    if choice == 0:
        cut = rng.randrange(len(data))
        del data[cut:]
        return f"truncate at {cut}"
    if choice == 1:
        flips = []
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(data), header_end + 64))
            data[i] ^= 1 << rng.randrange(8)
            flips.append(i)
        return f"bit flips in header at {flips}"
    if choice == 2:
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
        return f"bit flip at {i}"
    if choice == 3:  # overwrite an aligned 8-byte field in the header with an extreme value
        i = rng.randrange(0, max(8, header_end - 8), 8) if header_end > 8 else 0
        value = rng.choice([0, 1, 2**31 - 1, 2**32, 2**63 - 1, 2**64 - 1])
        data[i:i + 8] = struct.pack("<Q", value)
        return f"u64 {value} at {i}"
    i = rng.randrange(header_end) if header_end else 0  # a printable byte in JSON/metadata
    data[i] = rng.choice(b'{}[]":,0123456789-eE ')
    return f"byte at {i} set to {chr(data[i])!r}"


def run(path: str, original: bytes, header_end: int, rng: random.Random,
        outcomes: collections.Counter, kind: str) -> bool:
    data = bytearray(original)
    what = mutate(data, rng, header_end)
    with open(path, "wb") as f:
        f.write(data)
    source = os.path.dirname(path) if kind == "st" else path
    try:
        config, weights = ffnskip_ext.load_checkpoint(source)
        ffnskip_ext.Decoder(config, weights, max_seq_len=8).prefill([0])
        ffnskip_ext.Decoder.from_pretrained(source, max_seq_len=8).prefill([0])
        outcomes[f"{kind}: loaded"] += 1
    except CLEAN_ERRORS as e:
        # A clear message names the file (loader) or the tensor (the engine's value checks).
        if type(e) not in CLEAN_ERRORS or not (os.path.basename(path) in str(e)
                                               or "tensor '" in str(e)):
            print(f"FAIL {kind} ({what}): unclear {type(e).__name__}: {e}", flush=True)
            return False
        outcomes[f"{kind}: {type(e).__name__}"] += 1
    except Exception:
        print(f"FAIL {kind} ({what}):\n{traceback.format_exc()}", flush=True)
        return False
    return True


def main() -> int:
    model_dir, gguf_files, work, iterations, seconds, seed = sys.argv[1:]
    # A file that makes the loader allocate without bound must fail here, not take the machine.
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    rng = random.Random(int(seed))
    st_dir = os.path.join(work, "st")
    shutil.copytree(model_dir, st_dir, dirs_exist_ok=True)
    st_path = os.path.join(st_dir, "model.safetensors")
    with open(st_path, "rb") as f:
        st_original = f.read()
    # (kind, path the mutants are written to, original bytes, header length)
    targets = [("st", st_path, st_original, 8 + struct.unpack("<Q", st_original[:8])[0])]
    for gguf_file in gguf_files.split(","):
        kind = os.path.splitext(os.path.basename(gguf_file))[0]
        with open(gguf_file, "rb") as f:
            original = f.read()
        targets.append((kind, os.path.join(work, f"{kind}.gguf"), original,
                        min(len(original), 4096)))
    outcomes: collections.Counter = collections.Counter()
    deadline = time.monotonic() + float(seconds)
    ok = True
    for i in range(int(iterations)):
        if time.monotonic() > deadline:
            break
        kind, path, original, header_end = targets[i % len(targets)]
        ok &= run(path, original, header_end, rng, outcomes, kind)
    print(dict(outcomes), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
