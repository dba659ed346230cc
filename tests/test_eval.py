"""ffnskip_ext.eval: metrics on hand-made cases, task loaders, the harness end to end."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import ffnskip_ext
from ffnskip_ext import Routers
from ffnskip_ext.cli import main
from ffnskip_ext.cli.eval import parse_limits
from ffnskip_ext.eval import metrics
from ffnskip_ext.eval.harness import EvalSettings, PolicySpec, evaluate, load_items, read_rows
from ffnskip_ext.eval.report import PLOTS, write_report
from ffnskip_ext.eval.tasks import TASKS, bundled_path, load_task, select

# --- metrics -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("The  Eiffel Tower!", "eiffel tower"),
    ("It is 300,000 km.", "it is 300000 km"),
    ("Pi is 3.14.", "pi is 3.14"),
    ("Gabriel García Márquez", "gabriel garcia marquez"),
    ("Berners-Lee", "berners lee"),
    ("", ""),
])
def test_normalize(text, expected) -> None:
    assert metrics.normalize(text) == expected


def test_exact_and_contains_match() -> None:
    assert metrics.exact_match("Paris.\nIt is the capital of France.", ["paris"])
    assert metrics.exact_match("  \nthe Pacific Ocean", ["Pacific Ocean", "Pacific"])
    assert not metrics.exact_match("The capital is Paris.", ["Paris"])
    assert metrics.contains_match("The capital is Paris.", ["Paris"])
    assert not metrics.contains_match("A Parisian café.", ["Paris"])  # whole words only
    assert metrics.contains_match("about 299,792 km per second", ["300000", "299792"])
    assert not metrics.contains_match("It is 3.14159", ["3.14"])


def test_lcs_and_rouge_l() -> None:
    assert metrics.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert metrics.lcs_length([], ["x"]) == 0
    # articles are dropped: [cat sat on mat] vs [cat is on mat]: LCS 3, P = R = 3/4
    assert metrics.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.75)
    # LCS 2, P = 2/3, R = 1: F = 2 * (2/3) / (5/3) = 0.8
    assert metrics.rouge_l("red green blue", "red blue") == pytest.approx(0.8)
    assert metrics.rouge_l("Same words.", "same words") == 1.0
    assert metrics.rouge_l("one two", "three four") == 0.0
    assert metrics.rouge_l("", "") == 1.0
    assert metrics.rouge_l("", "something") == 0.0


@pytest.mark.parametrize("text, token_ids, loop", [
    ("I like it. I like it. I like it.", (), True),
    ("no no no no no no", (), True),
    ("x y z x y z x y z x y", (), True),  # the last copy cut off by the length limit
    ("this one, this one. This one; this one", (), True),  # punctuation aside
    ("ha ha ha", (), False),  # too short to call a loop
    ("one two three four five six seven", (), False),
    ("a b c a b c then something new", (), False),
    ("ashaashaashaasha", (9, 4, 7, 4, 7, 4, 7), True),  # one word, but its tokens loop
    ("fine", (1, 2, 3, 1, 2, 3), False),  # two periods are not a loop
])
def test_collapse_is_a_trailing_loop_of_words_or_tokens(text, token_ids, loop) -> None:
    assert metrics.collapsed(text, token_ids) is loop


def test_ends_in_loop_counts_periods_and_items() -> None:
    assert metrics.ends_in_loop([5] * 6) and not metrics.ends_in_loop([5] * 5)
    assert metrics.ends_in_loop([1, 2] * 3) and not metrics.ends_in_loop([1, 2] * 2 + [1])
    assert not metrics.ends_in_loop(list(range(13)) * 3)  # period 13 > max_period 12
    assert metrics.ends_in_loop(list(range(13)) * 3, max_period=13)


def test_first_divergence_and_perplexity() -> None:
    assert metrics.first_divergence([1, 2, 3], [1, 2, 4]) == 2
    assert metrics.first_divergence([5, 6], [5, 6]) == 2
    assert metrics.first_divergence([1, 2], [1, 2, 3]) == 2
    assert metrics.first_divergence([], [1]) == 0
    assert metrics.perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        metrics.perplexity(1.0, 0)


# --- task sets and loaders -----------------------------------------------------------------


def test_bundled_task_sets_have_the_promised_sizes() -> None:
    qa, summaries = load_task("qa"), load_task("summarization")
    chat, prose = load_task("chat"), load_task("perplexity")
    assert len(qa) >= 200 and all(q.answers for q in qa)
    assert len({q.topic for q in qa}) >= 8 and {q.difficulty for q in qa} == {
        "easy", "medium", "hard"}
    assert len(summaries) >= 40
    assert all(150 <= len(s.passage.split()) <= 500 for s in summaries)
    assert len(chat) >= 40 and all(len(c.turns) == 2 for c in chat)
    assert sum(len(p.text.split()) for p in prose) >= 5000
    for items in (qa, summaries, chat, prose):
        train = sum(i.split == "train" for i in items) / len(items)
        assert 0.2 <= train <= 0.3


@pytest.mark.parametrize("line, message", [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"id": "q2", "question": "Why?"}', "missing field(s) answers"),
    ('{"id": "q2", "question": "Why?", "answers": "because"}', "answers must be a non-empty list"),
    ('{"id": "q2", "question": "Why?", "answers": []}', "answers must be a non-empty list"),
    ('{"id": "q2", "question": "", "answers": ["x"]}', "question must be a non-empty string"),
    ('{"id": "q2", "question": "Why?", "answer": ["x"]}', "unknown field(s) answer"),
    ('{"id": "q2", "split": "dev", "question": "Why?", "answers": ["x"]}', "split must be"),
    ('{"id": "q1", "question": "Why?", "answers": ["x"]}', "duplicate id 'q1'"),
])
def test_loader_rejects_malformed_lines_naming_file_and_line(tmp_path, line, message) -> None:
    path = tmp_path / "user_qa.jsonl"
    path.write_text('{"id": "q1", "question": "Who?", "answers": ["me"]}\n\n' + line + "\n")
    with pytest.raises(ValueError) as info:
        load_task("qa", path)
    assert f"{path}:3:" in str(info.value) and message in str(info.value)


def test_loader_reads_user_files_of_every_task(tmp_path) -> None:
    lines = {
        "qa": {"id": "1", "question": "Q?", "answers": ["a"], "topic": "t"},
        "summarization": {"id": "1", "split": "train", "passage": "P.", "summary": "S."},
        "chat": {"id": "1", "turns": ["hi", "and?"], "system": "Be brief."},
        "perplexity": {"id": "1", "text": "Some prose."},
    }
    for task, record in lines.items():
        path = tmp_path / f"{task}.jsonl"
        path.write_text(json.dumps(record) + "\n")
        (item,) = load_task(task, path)
        assert item.id == "1" and item.split == record.get("split", "test")
    with pytest.raises(ValueError, match="unknown task"):
        load_task("translation")
    with pytest.raises(FileNotFoundError):
        load_task("qa", tmp_path / "missing.jsonl")
    assert bundled_path("qa").endswith("qa.jsonl")


def test_select_is_deterministic_per_seed() -> None:
    qa = load_task("qa")
    first = select(qa, "test", 10, seed=3)
    assert [q.id for q in first] == [q.id for q in select(qa, "test", 10, seed=3)]
    assert [q.id for q in first] != [q.id for q in select(qa, "test", 10, seed=4)]
    assert all(q.split == "test" for q in first) and len(first) == 10
    assert all(q.split == "train" for q in select(qa, "train", None, 0))


def test_limit_option() -> None:
    tasks = list(TASKS)
    assert parse_limits("20,qa=60", tasks) == {
        "qa": 60, "summarization": 20, "chat": 20, "perplexity": 20, "code": 20}
    assert parse_limits("chat=3", ["qa", "chat"]) == {"qa": None, "chat": 3}
    assert parse_limits(None, ["qa"]) == {"qa": None}
    with pytest.raises(ValueError, match="unknown task 'poems'"):
        parse_limits("poems=3", tasks)
    with pytest.raises(ValueError, match="not N or TASK=N"):
        parse_limits("qa=many", tasks)


# --- harness --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_chat_model_dir):
    decoder = ffnskip_ext.Decoder.from_pretrained(tiny_chat_model_dir, max_seq_len=1024)
    return decoder, ffnskip_ext.load_tokenizer(tiny_chat_model_dir)


def test_perplexity_is_decoded_step_by_step_under_the_policy(model, tiny_chat_model_dir) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    decoder, tokenizer = model
    settings = EvalSettings(limits={"perplexity": 2}, ppl_window=24, ppl_prompt=5)
    specs = [PolicySpec("static", ffnskip_ext.StaticFFNSkip([3, 4]), "static_ffn", 0.25)]
    rows = evaluate(decoder, tokenizer, specs, settings, progress=False)
    assert [r["policy"] for r in rows] == ["dense", "static"]
    dense, static = rows
    windows = load_items(settings, tokenizer)["perplexity"]
    assert all(len(w.tokens) == 24 for w in windows)
    # 5 prompt tokens prefilled, then every later position but the last is a decode step
    assert dense["stats"]["decode_tokens"] == 2 * (24 - 5 - 1)
    assert dense["metrics"]["predicted_tokens"] == 2 * (24 - 5)
    assert static["stats"]["skip_ratio"] == pytest.approx(2 / 8)
    # dense perplexity equals an uncached transformers forward over the same windows, scored
    # from the prompt's last token on
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir).eval()
    nll = count = 0
    with torch.inference_mode():
        for w in windows:
            logp = torch.log_softmax(hf(torch.tensor([w.tokens])).logits[0].double(), -1)
            targets = torch.tensor(w.tokens[5:])
            nll -= logp[torch.arange(4, len(w.tokens) - 1), targets].sum().item()
            count += len(targets)
    assert dense["metrics"]["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-3)
    assert dense["metrics"]["token_agreement"] == 1.0
    assert 0 <= static["metrics"]["token_agreement"] <= 1


# The code task has its own end-to-end run in test_code_task.py (its one item here could end
# at the first token under a random model, and every row here must decode).
SWEEP_TASKS = ["qa", "summarization", "chat", "perplexity"]
SWEEP_ARGS = ["--sweep", "--targets", "0.2", "--limit", "1,qa=3,perplexity=2",
              "--tasks", ",".join(SWEEP_TASKS),
              "--calibration-prompts", "2", "--ppl-window", "32", "--speed-tokens", "8",
              "--speed-rounds", "1", "--no-plots"]


@pytest.fixture(scope="module")
def sweep_args(tiny_chat_model_dir, tmp_path_factory):
    # The tiny model's tokenizer is byte-level with 512 positions: bundled passages are too
    # long for it, so summarisation reads a user file of short ones.
    passages = tmp_path_factory.mktemp("tasks") / "short_passages.jsonl"
    passages.write_text("".join(json.dumps(
        {"id": f"p{i}", "passage": f"Passage {i} is short. It has two sentences.",
         "summary": f"Passage {i} is short."}) + "\n" for i in range(3)))
    # FiRST routers whose gates depend on the prompt, so thresholds can reach the targets.
    config = json.loads((tiny_chat_model_dir / "config.json").read_text())
    rng = np.random.default_rng(0)
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    routers = Routers(rng.normal(0, 1, (layers, hidden)).astype(np.float32),
                      rng.normal(0, 1, layers).astype(np.float32))
    router_file = routers.save(tmp_path_factory.mktemp("routers") / "routers.safetensors")
    return ["eval", "--model", str(tiny_chat_model_dir), *SWEEP_ARGS,
            "--task-file", f"summarization={passages}", "--routers", router_file]


@pytest.fixture(scope="module")
def sweep_dir(sweep_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert main([*sweep_args, "--out", str(out)]) == 0
    return out


def test_sweep_end_to_end(sweep_dir) -> None:
    rows = read_rows(sweep_dir)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    assert policies == ["dense", "ffn_skip@20", "static_ffn@20", "random_ffn@20",
                        "layer_drop@20", "early_exit@20", "first@20", "first_w@20",
                        "speculative_ngram", "speculative_self", "speculative_auto"]
    # lossless rows decode the generation tasks only (teacher-forced perplexity is dense)
    assert len(rows) == 8 * len(SWEEP_TASKS) + 3 * (len(SWEEP_TASKS) - 1)
    dense_tokens = {r["task"]: [s["tokens"] for s in r["samples"]]
                    for r in rows if r["policy"] == "dense" and r["task"] != "perplexity"}
    lossless = [r for r in rows if r["method"] == "speculative"]
    assert {r["task"] for r in lossless} == {"qa", "summarization", "chat"}
    for row in lossless:
        assert [s["tokens"] for s in row["samples"]] == dense_tokens[row["task"]]
        assert row["speculative"]["lossless"] and row["metrics"]["identical"] == 1.0
        assert row["speculative"]["verify_passes"] > 0
    assert sum(r["speculative"]["drafted"] for r in lossless) > 0
    sizes = {r["task"]: r["n"] for r in rows if r["policy"] == "dense"}
    assert sizes == {"qa": 3, "summarization": 1, "chat": 1, "perplexity": 2}
    for row in rows:
        stats = row["stats"]
        assert row["tokens_per_s"] > 0
        assert stats["decode_tokens"] > 0 or row["method"] == "speculative"
        if row["method"] in ("static_ffn", "random_ffn", "layer_drop", "early_exit"):
            # matched exactly: k = round(0.2 * 8) = 2 of 8 FFN blocks on every decode token
            assert stats["skip_ratio"] == pytest.approx(0.25)
        if row["method"] in ("layer_drop", "early_exit"):
            assert stats["layer_skip_ratio"] == pytest.approx(0.25)
        if row["method"] in ("first", "first_w"):  # whole layers, routed per prompt
            assert stats["layer_skip_ratio"] == pytest.approx(stats["skip_ratio"])
        if row["policy"] == "dense":
            m = row["metrics"]
            assert m.get("identical", 1.0) == 1.0 and m.get("rouge_l_dense", 1.0) == 1.0
            assert stats["skip_ratio"] == 0.0
    calibrated = [r for r in rows if r["method"] == "ffn_skip"]
    assert sum(r["stats"]["skip_ratio"] for r in calibrated) > 0
    chat = next(r for r in rows if r["task"] == "chat" and r["policy"] == "dense")
    assert [s["id"] for s in chat["samples"]] == [f"{chat['samples'][0]['id'][:-2]}#{turn}"
                                                  for turn in (1, 2)]  # both turns answered
    summary = next(r for r in rows if r["task"] == "summarization")
    assert np.array(summary["trace"]["ffn_skipped"]).shape[1] == 8
    speeds = json.loads((sweep_dir / "speed.json").read_text())
    assert list(speeds) == policies and all(v > 0 for v in speeds.values())
    report = (sweep_dir / "report.md").read_text()
    command = report.split("```bash\n")[1].split("\n")[0]
    assert command.startswith("ffnskip eval --model ") and all(
        part in command for part in ("--sweep", "--targets 0.2", "--limit 1,qa=3,perplexity=2",
                                     f"--out {sweep_dir}", "--no-plots"))
    assert "## At ~20% skip" in report and "early_exit@20" in report
    assert "Partial run" not in report
    lossless_table = report.split("## Lossless speculative decoding")[1]
    assert "| speculative_auto | yes |" in lossless_table
    first = [r for r in rows if r["method"] in ("first", "first_w")]
    assert sum(r["stats"]["layer_skip_ratio"] for r in first) > 0
    table = next(line for line in report.splitlines() if line.startswith("| first@20 |"))
    assert "%" in table.split("|")[5]  # weights not read, from run.json's weight counts


def test_resume_finishes_an_interrupted_run(sweep_dir, sweep_args) -> None:
    path = sweep_dir / "rows.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    # an interrupted run: two rows lost, the last one half written
    path.write_text("".join(lines[:-3]) + lines[-3][:50])
    args = [*sweep_args, "--out", str(sweep_dir)]
    assert main(args) == 2  # no silent overwrite without --resume
    assert main([*args, "--resume"]) == 0
    resumed = read_rows(sweep_dir)
    before = [json.loads(line) for line in lines]
    assert [(r["policy"], r["task"]) for r in resumed] == [(r["policy"], r["task"])
                                                           for r in before]
    assert [r["metrics"] for r in resumed] == [r["metrics"] for r in before]  # deterministic
    assert main([*args, "--resume", "--seed", "1"]) == 2  # other settings: refused


def test_report_of_an_unfinished_run_names_the_rows_not_in_yet(sweep_dir, tmp_path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(sweep_dir, partial)
    lines = (partial / "rows.jsonl").read_text().splitlines(keepends=True)
    # the last four rows: speculative_self's chat and speculative_auto's three generation tasks
    (partial / "rows.jsonl").write_text("".join(lines[:-4]))
    report = Path(write_report(str(partial), plots=False)).read_text()
    assert ("**Partial run: 4 rows are not in yet** (speculative_self (chat), "
            "speculative_auto)") in report
    (partial / "rows.jsonl").write_text("".join(lines))
    assert "Partial run" not in Path(write_report(str(partial), plots=False)).read_text()


def test_report_plots(sweep_dir) -> None:
    pytest.importorskip("matplotlib")
    write_report(str(sweep_dir), plots=True)
    for name in PLOTS.values():
        assert (sweep_dir / name).stat().st_size > 0
        assert f"]({name})" in (sweep_dir / "report.md").read_text()


def test_size_trend_compares_models_relative_to_their_own_dense(sweep_dir, tmp_path) -> None:
    """Two "models" made from one sweep (dense QA set to 0.5 and 0.25, static FFN skip's to 0.2,
    the second with more weights): the table puts them in order of size and divides by each
    one's dense value."""
    small, large = tmp_path / "small", tmp_path / "large"
    dense_qa = {small: 0.5, large: 0.25}
    for directory, name, scale in ((small, "small.Q4_K_M.gguf", 1), (large, "large", 10)):
        directory.mkdir()
        run = json.loads((sweep_dir / "run.json").read_text())
        run["model_name"] = name
        run["weights"] = {k: v * scale for k, v in run["weights"].items()}
        (directory / "run.json").write_text(json.dumps(run))
        rows = read_rows(sweep_dir)
        for row in rows:
            if row["task"] == "qa" and row["policy"] in ("dense", "static_ffn@20"):
                row["metrics"]["contains"] = dense_qa[directory] if row["policy"] == "dense" \
                    else 0.2
        (directory / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "trend"
    # larger model first on the command line: the report still goes by size
    assert main(["trend", str(large), str(small), "--targets", "0.2", "--out", str(out),
                 "--no-plots"]) == 0
    report = (out / "size_trend.md").read_text()
    assert "ffnskip trend " in report and "| small.Q4_K_M.gguf |" in report
    section = report.split("## QA contains / dense")[1].split("##")[0]
    assert "| method | target | small (" in section and section.index("small (") < section.index(
        "large (")
    line = next(x for x in section.splitlines() if x.startswith("| static_ffn | 20% |"))
    # 0.2 / 0.5 and / 0.25; its measured ratio on QA: 2 of 8 FFN blocks
    assert [c.strip() for c in line.split("|")[3:5]] == ["0.400 (25.0%)", "0.800 (25.0%)"]
    assert "speculative" not in section  # lossless rows equal dense by construction
    assert main(["trend", str(small), "--out", str(out)]) == 2  # one model: nothing to compare
    assert main(["trend", str(small), str(large), "--targets", "0", "--out", str(out)]) == 2
    pytest.importorskip("matplotlib")
    assert main(["trend", str(small), str(large), "--targets", "0.2", "--out", str(out)]) == 0
    assert (out / "size_trend.png").stat().st_size > 0
    assert "](size_trend.png)" in (out / "size_trend.md").read_text()


@pytest.mark.parametrize(("window", "prompt"), [(1, 1), (24, 0), (24, 24)])
def test_perplexity_settings_are_checked(window: int, prompt: int) -> None:
    with pytest.raises(ValueError, match="ppl_"):
        EvalSettings(limits={"perplexity": 1}, ppl_window=window, ppl_prompt=prompt)
