"""The runtime (loading, tokenizer, generation) must not need torch: run it with torch blocked."""

from __future__ import annotations

import subprocess
import sys

from conftest import smollm2_path

SCRIPT = """
import sys
sys.modules["torch"] = None  # any 'import torch' now raises ImportError
import ffnskip_ext
path = sys.argv[1]
decoder = ffnskip_ext.Decoder.from_pretrained(path, dtype="float32", max_seq_len=128)
tokenizer = ffnskip_ext.load_tokenizer(path)
result = ffnskip_ext.generate(
    decoder, tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
    max_new_tokens=8,
)
print(result.text)
"""


def test_generate_with_torch_blocked() -> None:
    path = smollm2_path()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, path], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Paris" in done.stdout
