"""FiRST router training and the PyTorch reference of the engine's routing.

The routers themselves (the value and the file format) are ``ffnskip_ext.runtime.routers``;
this module needs torch and reads the bundled tasks' train split, prompted exactly as the
evaluation harness prompts them (``ffnskip_ext.eval.tasks``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..runtime.routers import (
    DEFAULT_THRESHOLD,
    ROUTER_PROMPT_TOKENS,
    Routers,
    default_router_path,
    threshold_logit,
)

if TYPE_CHECKING:
    import torch

INIT_BIAS = 3.0  # sigmoid(3) = 0.95: training starts with every layer on


# --------------------------------------------------------------------------- PyTorch


def load_model(model_path: str | os.PathLike[str]) -> torch.nn.Module:
    """The transformers model of a Hugging Face directory or a GGUF file: fp32, eval mode,
    eager attention, frozen."""
    import torch
    from transformers import AutoModelForCausalLM

    model_path = os.fspath(model_path)
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"model not found: {model_path}")
    kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "eager"}
    if os.path.isdir(model_path):
        model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(model_path)),
            gguf_file=os.path.basename(model_path), local_files_only=True, **kwargs)
    model.eval()
    model.requires_grad_(False)
    return model


Gate = Callable[[int, "torch.Tensor"], "torch.Tensor"]


def _gated_layers(model: torch.nn.Module, ids: torch.Tensor, prompt_len: int, gate: Gate,
                  mode: str, threshold: float = DEFAULT_THRESHOLD,
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The decoder stack over ``ids`` [1, T] with layer l gated by ``gate(l, m_l)`` (a router
    logit), m_l = mean over the first ``prompt_len`` positions of input_layernorm_l(x_l).

    ``mode`` "soft": x_{l+1} = g x Layer(x_l) + (1 - g) x_l with g = sigmoid(logit); "hard":
    the layer runs when logit >= logit(threshold) and is not computed otherwise, as in the
    engine; "straight-through": the hard forward with the soft gate's gradient. Returns the
    residual stream [T, d] before the final norm and every layer's logit.
    """
    import torch
    from transformers.masking_utils import create_causal_mask

    if mode not in ("soft", "hard", "straight-through"):
        raise ValueError(f"unknown gating mode {mode!r}")
    inner = model.model
    if getattr(inner, "has_sliding_layers", False):
        raise ValueError("FiRST routers: sliding-window attention layers are not supported")
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    x = inner.embed_tokens(ids)
    rope = inner.rotary_emb(x, position_ids=positions)
    mask = create_causal_mask(config=inner.config, inputs_embeds=x, attention_mask=None,
                              past_key_values=None, position_ids=positions)
    cut = threshold_logit(threshold)
    routed = min(prompt_len, ROUTER_PROMPT_TOKENS)
    logits = []
    for index, layer in enumerate(inner.layers[: inner.config.num_hidden_layers]):
        logit = gate(index, layer.input_layernorm(x[0, :routed]).mean(0))
        logits.append(logit)
        if mode == "hard" and float(logit) < cut:
            continue  # skipped: the residual passes through unchanged
        out = layer(x, attention_mask=mask, position_embeddings=rope, position_ids=positions)
        out = out[0] if isinstance(out, tuple) else out
        if mode != "hard":
            g = _soft_or_straight_through(logit, mode, cut)
            out = g * out + (1 - g) * x
        x = out
    return x[0], logits


def _soft_or_straight_through(logits: torch.Tensor, mode: str, cut: float) -> torch.Tensor:
    """sigmoid(logits), or in straight-through mode the hard 0/1 decisions carrying the
    sigmoid's gradient."""
    g = logits.sigmoid()
    if mode == "straight-through":
        return (logits >= cut).to(g.dtype) + g - g.detach()
    return g


def _router_logit(weight: torch.Tensor, bias: torch.Tensor) -> Gate:
    return lambda layer, features: features @ weight[layer] + bias[layer]


def reference_decisions(model: torch.nn.Module, routers: Routers, prompt_ids: Sequence[int],
                        threshold: float = DEFAULT_THRESHOLD,
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The engine's FiRST prefill in PyTorch: ``(keep bool [L], gates float32 [L], logits
    float32 [vocab] of the last prompt token)``. Layer l decides from the residual left by the
    hard decisions of the layers before it."""
    import torch

    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    if ids.shape[1] < 1:
        raise ValueError("prompt_ids must not be empty")
    layers = model.config.num_hidden_layers
    if routers.num_layers != layers or routers.hidden_size != model.config.hidden_size:
        raise ValueError(f"routers are [{routers.num_layers}, {routers.hidden_size}], the model "
                         f"is [{layers}, {model.config.hidden_size}]")
    gate = _router_logit(torch.from_numpy(routers.weight.copy()),
                         torch.from_numpy(routers.bias.copy()))
    with torch.inference_mode():
        x, logits = _gated_layers(model, ids, ids.shape[1], gate, "hard", threshold)
        out = model.lm_head(model.model.norm(x[-1:]))[0].float().numpy()
        router_logits = torch.stack(logits).float()
        keep = (router_logits >= threshold_logit(threshold)).numpy()
        gates = torch.sigmoid(router_logits).numpy().astype(np.float32)
    return keep, gates, out


# --------------------------------------------------------------------------- training data


@dataclasses.dataclass(frozen=True)
class Example:
    """One training sequence: the router sees ``prompt``, the loss is on ``target``."""

    kind: str  # qa, summarization, chat, prose or user
    prompt: tuple[int, ...]
    target: tuple[int, ...]


def _chat_pair(tokenizer: Any, messages: list[dict[str, str]],
               answer: str) -> tuple[list[int], list[int]]:
    """Prompt ids as the engine encodes them and the ids of ``answer`` as the assistant's turn
    (through the chat template, so its end-of-turn token is a target too)."""
    from ..runtime.generate import encode_prompt

    prompt = encode_prompt(tokenizer, messages)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=True)
    if isinstance(full, dict) or hasattr(full, "input_ids"):
        full = full["input_ids"]
    full = [int(i) for i in full]
    if full[: len(prompt)] == prompt and len(full) > len(prompt):
        target = full[len(prompt):]
    else:  # a template that renders history differently: append the answer and EOS
        target = list(tokenizer.encode(answer, add_special_tokens=False))
        if tokenizer.eos_token_id is not None:
            target.append(int(tokenizer.eos_token_id))
    eos = tokenizer.eos_token_id
    if eos is not None and eos in target:  # what follows the end of turn is never generated
        target = target[: target.index(eos) + 1]
    return prompt, target


def _text_pairs(tokenizer: Any, text: str, window: int) -> list[tuple[list[int], list[int]]]:
    """Consecutive windows of ``window`` tokens, each cut into prompt and continuation
    halves."""
    ids = [int(i) for i in tokenizer.encode(text)]
    pairs = []
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        if len(chunk) >= 4:
            half = len(chunk) // 2
            pairs.append((chunk[:half], chunk[half:]))
    return pairs


def _plain_pair(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    if getattr(tokenizer, "chat_template", None):
        return _chat_pair(tokenizer, [{"role": "user", "content": prompt}], completion)
    return ([int(i) for i in tokenizer.encode(prompt)],
            [int(i) for i in tokenizer.encode(completion, add_special_tokens=False)])


def bundled_examples(model_path: str | os.PathLike[str], tokenizer: Any, max_tokens: int,
                     progress: bool = True, num_threads: int | None = None) -> list[Example]:
    """(prompt, target) pairs from the train split of every bundled task, prompted exactly as
    the evaluation harness prompts them.

    Targets: the reference summary (summarization) and the second half of 128-token windows
    (prose, the harness's perplexity window); for qa and chat, the dense model's own greedy
    answer as the harness generates it (qa references are bare strings while the model answers
    in sentences, so their cross-entropy mostly measures the format; chat has no references).
    Chat turns follow the earlier turns and the dense answers to them, as in the harness.
    """
    from tqdm.auto import tqdm

    from ..eval.harness import EvalSettings
    from ..eval.tasks import (
        QA_STOP,
        chat_opening,
        load_task,
        prose_windows,
        qa_messages,
        select,
        summary_messages,
    )
    from ..runtime.decoder import Decoder
    from ..runtime.generate import encode_prompt, generate

    settings = EvalSettings(limits={})  # the harness's generation lengths
    decoder = Decoder.from_pretrained(model_path, max_seq_len=2048, num_threads=num_threads)
    eos = tokenizer.eos_token_id

    def dense(messages: list[dict[str, str]], max_new_tokens: int,
              stop: list[str] | None = None) -> tuple[str, list[int], list[int]]:
        result = generate(decoder, tokenizer, messages, max_new_tokens=max_new_tokens,
                          stop=stop)
        ended = result.finish_reason == "eos" and eos is not None
        return (result.text, encode_prompt(tokenizer, messages),
                result.token_ids + ([int(eos)] if ended else []))

    pairs: list[tuple[str, list[int], list[int]]] = []
    qa = select(load_task("qa"), "train", None, 0)
    for item in tqdm(qa, desc="dense qa answers", disable=not progress, leave=False):
        _, prompt, target = dense(qa_messages(item), settings.qa_max_new_tokens,
                                  stop=list(QA_STOP))
        pairs.append(("qa", prompt, target))
    for item in select(load_task("summarization"), "train", None, 0):
        pairs.append(("summarization",
                      *_chat_pair(tokenizer, summary_messages(item), item.summary)))
    chats = select(load_task("chat"), "train", None, 0)
    for item in tqdm(chats, desc="dense chat answers", disable=not progress, leave=False):
        messages = chat_opening(item)
        for turn in item.turns:
            messages.append({"role": "user", "content": turn})
            answer, prompt, target = dense(messages, settings.chat_max_new_tokens)
            pairs.append(("chat", prompt, target))
            messages.append({"role": "assistant", "content": answer})
    for w in prose_windows(select(load_task("perplexity"), "train", None, 0), tokenizer,
                           min(max_tokens, settings.ppl_window)):
        half = len(w.tokens) // 2
        pairs.append(("prose", list(w.tokens[:half]), list(w.tokens[half:])))
    return [_clip(kind, p, t, max_tokens) for kind, p, t in pairs if p and t]


def read_examples(path: str | os.PathLike[str], tokenizer: Any, max_tokens: int) -> list[Example]:
    """Examples from a JSONL file of {"prompt", "completion"} rows (the prompt goes through
    the chat template when the tokenizer has one) or {"text"} rows (cut like prose)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training data not found: {path}")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from e
            if isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip():
                examples += [_clip("user", p, t, max_tokens)
                             for p, t in _text_pairs(tokenizer, row["text"], max_tokens)]
            elif (isinstance(row, dict) and isinstance(row.get("prompt"), str)
                  and isinstance(row.get("completion"), str) and row["completion"]):
                examples.append(_clip("user", *_plain_pair(tokenizer, row["prompt"],
                                                           row["completion"]), max_tokens))
            else:
                raise ValueError(f'{where}: expected {{"prompt", "completion"}} or {{"text"}} '
                                 "with non-empty strings")
    examples = [e for e in examples if e.prompt and e.target]
    if not examples:
        raise ValueError(f"{path}: no training examples")
    return examples


def _clip(kind: str, prompt: list[int], target: list[int], max_tokens: int) -> Example:
    """At most ``max_tokens`` tokens: the target keeps its start (what the prompt leaves, at
    least half the budget), the prompt its end (the final turn and generation prompt)."""
    if len(prompt) + len(target) > max_tokens:
        target = target[: max(max_tokens - len(prompt), max_tokens // 2)]
        prompt = prompt[-(max_tokens - len(target)):]
    return Example(kind, tuple(prompt), tuple(target))


# --------------------------------------------------------------------------- training


def _target_ce(model: torch.nn.Module, example: Example, gate: Gate, mode: str,
               threshold: float = DEFAULT_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the target tokens of the gated forward, and the router logits [L]."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor([example.prompt + example.target])
    start = len(example.prompt)
    x, logits = _gated_layers(model, ids, start, gate, mode, threshold)
    # The lm_head (the largest matrix) only at the positions that predict a target token.
    predicted = model.lm_head(model.model.norm(x[start - 1:-1]))
    return F.cross_entropy(predicted.float(), ids[0, start:]), torch.stack(logits)


def evaluate_routers(model: torch.nn.Module, routers: Routers, examples: Sequence[Example],
                     threshold: float = DEFAULT_THRESHOLD,
                     progress: bool = True) -> dict[str, dict[str, float]]:
    """Per example kind and for ``all``: layers kept at ``threshold`` as the engine decides
    (mean, min, max), the mean gate, and the target cross-entropy with those decisions
    (``hard_ce``) and with every layer (``dense_ce``)."""
    import torch
    from tqdm.auto import tqdm

    routed = _router_logit(torch.from_numpy(routers.weight.copy()),
                           torch.from_numpy(routers.bias.copy()))
    every = _router_logit(torch.zeros(routers.weight.shape), torch.full(routers.bias.shape, 1.0))
    rows: dict[str, list[tuple[float, ...]]] = {}
    with torch.inference_mode():
        for ex in tqdm(examples, desc="hard decisions", disable=not progress, leave=False):
            # Causal attention: the prompt positions, hence the decisions, ignore the target.
            hard_ce, logits = _target_ce(model, ex, routed, "hard", threshold)
            dense_ce, _ = _target_ce(model, ex, every, "hard", 0.0)
            keep = logits >= threshold_logit(threshold)
            rows.setdefault(ex.kind, []).append((
                float(keep.sum()), float(torch.sigmoid(logits).mean()), hard_ce.item(),
                dense_ce.item()))
    rows["all"] = [r for values in list(rows.values()) for r in values]
    out = {}
    for kind, values in rows.items():
        table = np.array(values)
        out[kind] = {"examples": len(values), "kept_layers": float(table[:, 0].mean()),
                     "min_kept": int(table[:, 0].min()), "max_kept": int(table[:, 0].max()),
                     "mean_gate": float(table[:, 1].mean()), "hard_ce": float(table[:, 2].mean()),
                     "dense_ce": float(table[:, 3].mean())}
    return out


def fit_routers(model: torch.nn.Module, examples: Sequence[Example], *, epochs: int,
                lr: float, target_usage: float | None = None, usage_weight: float = 1.0,
                penalty: float = 0.01, batch_size: int = 8, seed: int = 0,
                straight_through: bool = False, threshold: float = DEFAULT_THRESHOLD,
                init: Routers | None = None,
                progress: bool = True) -> tuple[Routers, list[dict[str, Any]]]:
    """The training loop of :func:`train_routers` on ready examples: the routers and, per
    epoch, the mean loss, cross-entropy, gate (as the loss saw it) and per-layer gates.
    Training starts from ``init`` when given (e.g. straight-through after soft training),
    else from w = 0, b = INIT_BIAS."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    if init is None:
        weight, bias = torch.zeros(layers, hidden), torch.full((layers,), INIT_BIAS)
    elif (init.num_layers, init.hidden_size) != (layers, hidden):
        raise ValueError(f"init routers are [{init.num_layers}, {init.hidden_size}], the model "
                         f"is [{layers}, {hidden}]")
    else:
        weight, bias = torch.tensor(init.weight), torch.tensor(init.bias)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    rng = random.Random(seed)
    order = list(range(len(examples)))
    history: list[dict[str, Any]] = []
    steps = epochs * math.ceil(len(examples) / batch_size)
    bar = tqdm(total=steps, desc="training routers", disable=not progress)
    mode, cut = "straight-through" if straight_through else "soft", threshold_logit(threshold)
    for epoch in range(epochs):
        rng.shuffle(order)
        sums = np.zeros(3)
        layer_gates = np.zeros(layers)
        for begin in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[begin:begin + batch_size]]
            optimizer.zero_grad()
            for example in batch:
                ce, logits = _target_ce(model, example, _router_logit(weight, bias), mode,
                                        threshold)
                gates = _soft_or_straight_through(logits, mode, cut)
                usage = gates.mean()
                layer_gates += gates.detach().numpy()
                loss = ce + penalty * usage
                if target_usage is not None:
                    loss = loss + usage_weight * (usage - target_usage) ** 2
                (loss / len(batch)).backward()
                sums += (loss.item(), ce.item(), usage.item())
            optimizer.step()
            bar.update()
            done = begin + len(batch)
            bar.set_postfix(epoch=epoch + 1, loss=f"{sums[0] / done:.3f}",
                            ce=f"{sums[1] / done:.3f}", gate=f"{sums[2] / done:.3f}")
        history.append({"epoch": epoch + 1, "loss": sums[0] / len(order),
                        "ce": sums[1] / len(order), "mean_gate": sums[2] / len(order),
                        "layer_gates": np.round(layer_gates / len(order), 4).tolist()})
    bar.close()
    return Routers(weight.detach().numpy(), bias.detach().numpy()), history


def train_routers(
    model_path: str | os.PathLike[str],
    *,
    data: str | os.PathLike[str] | None = None,
    epochs: int = 3,
    lr: float = 1e-2,
    max_tokens: int = 384,
    target_usage: float | None = None,
    usage_weight: float = 1.0,
    penalty: float = 0.01,
    batch_size: int = 8,
    seed: int = 0,
    straight_through: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
    num_threads: int | None = None,
) -> Routers:
    """Trains FiRST routers on a frozen model with soft gates and saves them (``out``, by
    default next to the model).

    Loss per example: cross-entropy on the target + ``penalty`` x mean gate (+ ``usage_weight``
    x (mean gate - ``target_usage``)^2 when ``target_usage`` is given); Adam over mini-batches
    of ``batch_size`` examples. ``data`` None trains on the bundled tasks' train split. The
    returned routers' metadata ``training`` entry (JSON) holds the settings, the per-epoch
    losses, the wall time and the layers kept at ``threshold`` on the training prompts.
    ``num_threads`` sets torch's (and the engine's) threads for the run.
    """
    import torch

    from ..runtime.tokenizer import load_tokenizer

    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 4:
        raise ValueError(f"max_tokens must be an integer >= 4, got {max_tokens!r}")
    if target_usage is not None and not 0 <= target_usage <= 1:
        raise ValueError(f"target_usage must be in [0, 1], got {target_usage!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_threads is not None and (isinstance(num_threads, bool)
                                    or not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
    model_path = os.fspath(model_path)
    started = time.perf_counter()
    tokenizer = load_tokenizer(model_path)
    examples = (bundled_examples(model_path, tokenizer, max_tokens, progress, num_threads)
                if data is None else read_examples(data, tokenizer, max_tokens))
    model = load_model(model_path)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        routers, history = fit_routers(model, examples, epochs=epochs, lr=lr,
                                       target_usage=target_usage, usage_weight=usage_weight,
                                       penalty=penalty, batch_size=batch_size, seed=seed,
                                       straight_through=straight_through,
                                       threshold=threshold, progress=progress)
        kept = evaluate_routers(model, routers, examples, threshold, progress)
    finally:
        torch.set_num_threads(previous_threads)
    settings = {"epochs": epochs, "lr": lr, "max_tokens": max_tokens,
                "target_usage": target_usage, "usage_weight": usage_weight, "penalty": penalty,
                "batch_size": batch_size, "seed": seed, "straight_through": straight_through,
                "threshold": threshold, "examples": len(examples)}
    trained_on = (os.fspath(data) if data is not None
                  else "bundled train split (qa, summarization, chat, prose)")
    routers = Routers(routers.weight, routers.bias, metadata={
        "model": os.path.basename(os.path.normpath(model_path)),
        "threshold_hint": str(threshold), "trained_on": trained_on,
        "training": json.dumps({"settings": settings, "history": history, "kept": kept,
                                "seconds": round(time.perf_counter() - started, 1)}),
    })
    routers.save(out if out is not None else default_router_path(model_path))
    return routers
