"""The ffnskip command as a user drives it: chat over stdin, prompts from stdin and files,
Ctrl-C, pipes closed early, conventions (--version, defaults, hints), progress, warnings."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import smollm2_path

CLI = [sys.executable, "-m", "ffnskip_ext"]
COUNT = "Count from 1 to 1000, one number per line."


def run_cli(*args: str, stdin: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_chat_keeps_the_cache_between_turns_and_resets(tiny_chat_model_dir) -> None:
    done = run_cli("chat", "--model", str(tiny_chat_model_dir), "--max-new-tokens", "6",
                   "--system", "be brief", stdin="hello\nand again\n/stats\n/reset\nthird\n")
    assert done.returncode == 0, done.stderr[-3000:]
    cached = [int(n) for n in re.findall(r"\((\d+) cached\)", done.stderr)]
    assert len(cached) == 3, done.stderr
    assert cached[0] == 0 and cached[1] > 0, done.stderr  # turn 2 reuses turn 1
    assert cached[2] == 0, done.stderr  # after /reset
    assert "[cache " in done.stderr and "[conversation cleared]" in done.stderr
    assert "Traceback" not in done.stderr


def test_prompt_from_an_argument_stdin_or_a_file_is_the_same(tiny_chat_model_dir,
                                                             tmp_path) -> None:
    model = ["--model", str(tiny_chat_model_dir), "--max-new-tokens", "8", "--quiet"]
    prompt = "tell me\nabout it"
    (tmp_path / "prompt.txt").write_text(prompt)
    outputs = [run_cli("generate", prompt, *model),
               run_cli("generate", "-", *model, stdin=prompt),
               run_cli("generate", "--file", str(tmp_path / "prompt.txt"), *model)]
    for done in outputs:
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stderr == ""  # --quiet
    assert outputs[0].stdout == outputs[1].stdout == outputs[2].stdout
    missing = run_cli("generate", *model)
    assert missing.returncode == 2 and "no prompt" in missing.stderr


def test_a_run_inside_the_warm_up_says_why_nothing_was_skipped() -> None:
    import ffnskip_ext
    from ffnskip_ext.cli.options import warmup_note
    from random_models import random_decoder
    from test_reliability import NoEosByteTokenizer

    decoder = random_decoder(num_layers=4)

    def note_after(policy: ffnskip_ext.Policy, tokens: int) -> str:
        decoder.set_policy(policy)
        decoder.reset_stats()
        ffnskip_ext.generate(decoder, NoEosByteTokenizer(), "abc", max_new_tokens=tokens)
        return warmup_note(decoder)

    assert "all 4 decode steps were inside the policy's warm-up of 32 tokens" in note_after(
        ffnskip_ext.FFNSkipPolicy(), 5)
    assert note_after(ffnskip_ext.FFNSkipPolicy(warmup_tokens=2), 8) == ""
    assert note_after(ffnskip_ext.DensePolicy(), 5) == ""


def test_stop_strings_unescape_and_dtype_aliases() -> None:
    from ffnskip_ext.cli import build_parser
    from ffnskip_ext.cli.options import unescape

    assert unescape(r"a\nb\t\\n\q") == "a\nb\t\\n\\q"
    args = build_parser().parse_args(["generate", "x", "--stop", r"\n\n", "--dtype", "fp16"])
    assert args.stop == ["\n\n"] and args.dtype == "fp16"


def test_version_help_defaults_and_a_hub_id_hint() -> None:
    version = run_cli("--version")
    assert version.returncode == 0 and re.fullmatch(r"ffnskip \d+\.\d+\.\d+\n", version.stdout)
    help_text = run_cli("generate", "--help").stdout
    assert "(default: 128)" in help_text and "(default: None)" not in help_text
    hub = run_cli("generate", "hi", "--model", "Qwen/Qwen2.5-0.5B-Instruct")
    assert hub.returncode == 2
    assert "Hugging Face Hub id" in hub.stderr and "ffnskip models pull" in hub.stderr


def test_progress_is_said_only_for_slow_steps(capsys) -> None:
    from ffnskip_ext.cli.options import progress

    with progress("quick", quiet=False):
        pass
    with progress("slow", quiet=True):
        time.sleep(1.2)
    assert capsys.readouterr().err == ""
    with progress("slow", quiet=False):
        time.sleep(1.2)
    err = capsys.readouterr().err
    assert "ffnskip: slow...\n" in err and re.search(r"ffnskip: slow: 1\.\d s", err)


def test_no_pytorch_advice_without_torch() -> None:
    script = ("import sys; sys.modules['torch'] = None\n"
              "import ffnskip_ext\n"
              "ffnskip_ext.load_tokenizer(sys.argv[1])\n"
              "import transformers\n"
              "transformers.logging.get_logger('transformers').warning('a real warning')\n")
    done = subprocess.run([sys.executable, "-c", script, smollm2_path()], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PyTorch was not found" not in done.stderr
    assert "a real warning" in done.stderr


def test_first_routers_ship_for_the_default_model(tiny_model_dir) -> None:
    import ffnskip_ext

    policy = ffnskip_ext.FiRSTPolicy.for_model(smollm2_path())
    assert policy.routers.weight.shape[0] == 30
    _, path = tiny_model_dir("llama_mha_tied")
    with pytest.raises(FileNotFoundError, match="ffnskip train-routers"):
        ffnskip_ext.FiRSTPolicy.for_model(path)


@pytest.mark.usefixtures("sigint_reaches_children")
def test_ctrl_c_ends_generate_with_partial_stats_and_no_traceback() -> None:
    smollm2_path()
    process = subprocess.Popen([*CLI, "generate", COUNT, "--max-new-tokens", "2000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout.read(1)  # decoding has begun
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err.decode()[-3000:]
    assert b"[interrupted after" in err and b"Traceback" not in err


def test_a_pipe_closed_early_ends_generate_quietly() -> None:
    smollm2_path()
    done = subprocess.run(
        f"{sys.executable} -m ffnskip_ext generate '{COUNT}' --max-new-tokens 300 | head -c 10",
        shell=True, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert len(done.stdout) == 10
    assert "BrokenPipeError" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.usefixtures("sigint_reaches_children")
def test_ctrl_c_in_chat_stops_the_answer_and_the_chat_goes_on() -> None:
    smollm2_path()
    process = subprocess.Popen([*CLI, "chat", "--max-new-tokens", "2000"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        process.stdin.write((COUNT + "\n").encode())
        process.stdin.flush()
        assert process.stdout.read(1)  # the answer is streaming
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(b"/stats\n", timeout=120)
    finally:
        process.kill()
    text = err.decode()
    assert process.returncode == 0, text[-3000:]
    assert "finish=cancelled" in text and "[cache " in text and "Traceback" not in text


def test_an_uncapped_ffn_skip_policy_gets_a_warning(tiny_chat_model_dir) -> None:
    model = ["--model", str(tiny_chat_model_dir), "--max-new-tokens", "2"]
    uncapped = run_cli("generate", "hi", *model, "--policy", '{"kind": "ffn_skip", "version": 1}')
    assert uncapped.returncode == 0, uncapped.stderr[-3000:]
    assert "warning: an FFN-SkipLLM policy without max_skips_per_token" in uncapped.stderr
    preset = run_cli("generate", "hi", *model, "--policy", "ffn-skip")
    assert preset.returncode == 0 and "warning" not in preset.stderr, preset.stderr[-3000:]
