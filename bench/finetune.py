"""One fine-tuning run of one arm (LoRA + AdamW, or LoRA + ISTAdamW with a policy), shared by the quality scripts.

An *arm* is the way layers are chosen: ``lora`` (every layer every step,
``torch.optim.AdamW``), ``ist`` (ISTAdamW, the authors' rule), ``ist-paper``
(ISTAdamW, the paper's rule), ``random`` (ISTAdamW, uniform layers: LISA /
random sparse tuning), or ``policy:NAME`` (ISTAdamW with ``policy=NAME``).
Every arm of one seed starts from the same weights, the same LoRA init and
sees the same batches in the same order.

Tokens: a task whose answers are all single tokens (a verbalizer: " even"/
" odd", " negative"/" positive") runs left-padded with ``logits_to_keep=1``
and a cross-entropy on the last position; there IST's probes get the targets
through ``opt.set_loss_inputs``, since they are no forward input. Other tasks
run left-padded with ``labels`` (the answer's tokens, prompt masked) and
``logits_to_keep`` (the LM head runs on the answer's positions only). A
classifier (``Batches(..., head=True)``: an encoder with a classification
head, e.g. MiniLM) takes the prompt and ``labels`` = the answer's index.
"""

from __future__ import annotations

import copy
import functools
import math
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from common import peak_step_bytes, state_bytes_on_device
from peft import LoraConfig, get_peft_model
from tasks import Example, Task

from ist_optim import ISTAdamW, LayerwiseCKA
from ist_optim.layers import discover_layers

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARMS = ("lora", "ist", "ist-paper", "random")


def check_arm(arm: str) -> str:
    if arm not in ARMS and not arm.startswith("policy:"):
        raise ValueError(f"unknown arm {arm!r}: expected one of {ARMS} or policy:NAME")
    return arm


# ---------------------------------------------------------------------- tokens
class WordTokenizer:
    """A file-free tokenizer for config-built smoke-test models: one id per word (with its leading space)."""

    pattern = re.compile(r"\s?\w+|\s?[^\w\s]|\n")

    def __init__(self, texts: list[str]) -> None:
        words = sorted({w for text in texts for w in self.pattern.findall(text)})
        self.vocab = {w: i + 2 for i, w in enumerate(words)}  # 0 pads, 1 is unknown
        self.pad_token_id = 0

    @classmethod
    def for_task(cls, task: Task) -> WordTokenizer:
        return cls([text for ex in task.train + task.val + task.test for text in (ex.prompt, *ex.choices)])

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(w, 1) for w in self.pattern.findall(text)]


class HFTokens:
    """``encode`` for an HF tokenizer: prompts with its special tokens, answers without."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, text: str, prompt: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=prompt).input_ids


def _encode(tokens, text: str, prompt: bool) -> list[int]:
    return tokens.encode(text, prompt=prompt) if isinstance(tokens, HFTokens) else tokens.encode(text)


class Batches:
    """Turns examples into model inputs for training and for scoring choices."""

    def __init__(self, tokens, task: Task, max_prompt_tokens: int = 256, head: bool = False) -> None:
        self.tokens = tokens
        self.max_prompt_tokens = max_prompt_tokens
        examples = task.train + task.val + task.test
        choices = {c for ex in examples for c in ex.choices}
        self.choice_ids = {c: _encode(tokens, c, prompt=False) for c in choices}
        shared = {ex.choices for ex in examples}
        self.head = head  # a classification head: labels are the answers' indices
        if head and len(shared) != 1:
            raise ValueError(
                f"{task.name}: a classification head needs one set of choices shared by every example, "
                f"but the examples have {len(shared)} different sets (score it as a causal LM instead)"
            )
        self.num_labels = len(next(iter(shared))) if len(shared) == 1 else 0
        # A verbalizer: one set of single-token answers shared by every example; its loss is the
        # cross-entropy over those label words at the last position (a classification head in words).
        self.verbalizer = not head and len(shared) == 1 and all(len(ids) == 1 for ids in self.choice_ids.values())
        self.label_words = (
            torch.tensor([self.choice_ids[c][0] for c in next(iter(shared))]) if self.verbalizer else None
        )

    def _prompt(self, ex: Example) -> list[int]:
        ids = _encode(self.tokens, ex.prompt, prompt=True)
        if self.head:  # an encoder pools its first token ([CLS]): keep the start
            return ids[: self.max_prompt_tokens]
        return ids[-self.max_prompt_tokens :]  # a causal LM answers after the end: keep the question

    def train_batch(self, examples: list[Example]) -> dict[str, Any]:
        """Inputs of a training forward, and ``target`` (verbalizer) or ``labels`` (continuations, class indices)."""
        if self.head:
            batch = self._pad([self._prompt(ex) for ex in examples], left=False)
            batch["labels"] = torch.tensor([ex.answer for ex in examples])
            return batch
        if self.verbalizer:
            rows = [self._prompt(ex) for ex in examples]
            batch = self._pad(rows, left=True)
            batch["target"] = torch.tensor([ex.answer for ex in examples])
            return batch
        rows, labels = [], []
        for ex in examples:
            prompt, answer = self._prompt(ex), self.choice_ids[ex.choices[ex.answer]]
            rows.append(prompt + answer)
            labels.append([-100] * len(prompt) + answer)
        # Left-padded, so every answer ends at the last position: the LM head and the loss then run on the last
        # ``keep`` positions only (``logits_to_keep``; labels cut to match, the first of them masked), not on the
        # whole prompt: at 128-token prompts and a 49k vocabulary that is a fifth of the forward.
        keep = max(len(self.choice_ids[ex.choices[ex.answer]]) for ex in examples) + 1
        batch = self._pad(rows, left=True)
        batch["labels"] = self._pad(labels, left=True, value=-100)["input_ids"][:, -keep:]
        batch["logits_to_keep"] = keep
        return batch

    def _pad(self, rows: list[list[int]], left: bool, value: int | None = None) -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self.tokens.pad_token_id if value is None else value
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            mask[i, span] = 1
        return {"input_ids": ids, "attention_mask": mask}


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The batch's tensors on ``device`` (``logits_to_keep`` is an int)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def forward_loss(model: torch.nn.Module, batches: Batches, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "target"}
    if "target" in batch:
        return verbalizer_loss(batches.label_words, model(**inputs, logits_to_keep=1), target=batch["target"])
    return model(**inputs).loss


def verbalizer_loss(
    label_words: torch.Tensor, output: Any, *args: Any, target: torch.Tensor, **kwargs: Any
) -> torch.Tensor:
    """Cross-entropy over the label words' logits at the last position (with ``functools.partial``, the probe ``loss_fn``)."""
    return F.cross_entropy(output.logits[:, -1, label_words.to(output.logits.device)].float(), target)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Batches, examples: list[Example], batch_size: int = 32
) -> dict[str, float]:
    """Accuracy (most likely choice) and loss (mean cross-entropy of the right answer's tokens)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, losses = 0, []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        if batches.head:
            batch = batches.train_batch(chunk)
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            logits = logits.logits.float().cpu()
            losses += F.cross_entropy(logits, batch["labels"], reduction="none").tolist()
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            continue
        if batches.verbalizer:
            batch = batches.train_batch(chunk)
            inputs = {k: v.to(device) for k, v in batch.items() if k != "target"}
            logits = model(**inputs, logits_to_keep=1).logits[:, -1, batches.label_words.to(device)].float().cpu()
            losses += F.cross_entropy(logits, batch["target"], reduction="none").tolist()
            correct += int((logits.argmax(-1) == batch["target"]).sum())
            continue
        # One row per (example, choice): the choice's summed token log-probabilities.
        flat = [Example(ex.prompt, (c,), 0) for ex in chunk for c in ex.choices]
        batch = batches.train_batch(flat)  # logits of the last positions only, labels cut to match
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            logits_to_keep=batch["logits_to_keep"],
        )
        logits = logits.logits.float().cpu()
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
        summed, counts = token_logp.sum(-1), (labels != -100).sum(-1)
        row = 0
        for ex in chunk:
            scores = summed[row : row + len(ex.choices)]
            correct += int(scores.argmax().item() == ex.answer)
            losses.append(-(scores[ex.answer] / counts[row + ex.answer]).item())
            row += len(ex.choices)
    model.train(was_training)
    return {"accuracy": correct / len(examples), "loss": statistics.fmean(losses)}


# ---------------------------------------------------------------------- one run
@dataclass
class RunConfig:
    arm: str
    steps: int = 60
    batch_size: int = 16
    lr: float = 1e-3
    sparse_lr_scale: float = 1.0  # lr multiplier of the sparse arms (each layer trains in a fraction of steps)
    rank: int = 8
    active_layers: float = 0.25
    probe_interval: int = 10
    importance_lr: float = 10.0
    suppression: float = 0.25
    num_probes: int = 3
    probe_layers: int | float = 0.5  # N_v (suppressed layers under the reference rule); an int is a count
    probe_rows: int | float = 1.0  # IST's probe_rows: the share (or count) of the captured batch's rows probed
    reward: str = "difference"  # or "standardized" (see ist_optim.scheduler)
    lr_follows_rate: bool = False  # per-layer lr: min(sparse_lr_scale, steps / steps the layer trained) x lr
    seed: int = 0
    eval_at: tuple[int, ...] = ()  # steps after which the validation split is scored
    measure_memory: bool = True


@dataclass
class RunResult:
    config: RunConfig
    train_loss: list[float] = field(default_factory=list)
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> val accuracy, loss
    step_seconds: list[float] = field(default_factory=list)
    probe_step: list[bool] = field(default_factory=list)
    importance: list[list[float]] = field(default_factory=list)  # after each importance update
    importance_steps: list[int] = field(default_factory=list)
    layer_counts: list[int] = field(default_factory=list)  # steps each layer trained
    peak_bytes: int | None = None  # weights + optimizer state + the peak of one step's new allocations
    seconds: float = 0.0
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None


CALIBRATION_ROWS = 128  # layer-wise LoRA with CKA: the first 128 training samples, as its released code


def calibration_batches(batches: Batches, task: Task, device: torch.device, size: int = 16) -> list[dict[str, Any]]:
    """The inputs of the first ``CALIBRATION_ROWS`` training examples (for ``policy:layerwise_cka``)."""
    rows = task.train[:CALIBRATION_ROWS]
    out = []
    for start in range(0, len(rows), size):
        batch = batches.train_batch(rows[start : start + size])
        out.append({k: batch[k].to(device) for k in ("input_ids", "attention_mask")})
    return out


def build_optimizer(
    model: torch.nn.Module,
    config: RunConfig,
    label_words: torch.Tensor | None,
    calibration: list[dict[str, Any]] | None = None,
) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.arm == "lora":
        return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    # The lr scale is for the layers' adapters (each trains in a fraction of the steps); what lies outside every
    # layer (a classifier head) trains every step, so it keeps LoRA-all's lr. The layers are the ones ISTAdamW
    # will find (the same discovery), in its order: with lr_follows_rate group i is layer i ("layer" key).
    layer_map = discover_layers(model, trainable)
    scaled = config.lr * config.sparse_lr_scale
    if config.lr_follows_rate:  # one group per layer, so each layer's lr can follow how often it trains
        groups = [{"params": params, "lr": scaled, "layer": i} for i, params in enumerate(layer_map.params)]
    else:
        groups = [{"params": [p for params in layer_map.params for p in params], "lr": scaled}]
    if layer_map.other_params:
        groups.append({"params": layer_map.other_params, "lr": config.lr})
    options: dict[str, Any] = dict(
        params=groups,
        weight_decay=0.0,
        active_layers=config.active_layers,
        probe_interval=config.probe_interval,
        importance_lr=config.importance_lr,
        suppression=config.suppression,
        num_probes=config.num_probes,
        probe_layers=config.probe_layers,
        probe_rows=config.probe_rows,
        reward=config.reward,
        seed=config.seed,
    )
    if config.arm == "ist-paper":
        options["rule"] = "paper"
    elif config.arm == "random":
        options["policy"] = "random"
    elif config.arm == "policy:layerwise_cka":  # the seed's rule: ranked on the pretrained model before training
        options["policy"] = LayerwiseCKA(calibration, active_layers=config.active_layers)
    elif config.arm.startswith("policy:"):
        options["policy"] = config.arm.split(":", 1)[1]
    if label_words is not None:  # the targets reach the probes through opt.set_loss_inputs
        options["loss_fn"] = functools.partial(verbalizer_loss, label_words)
    return ISTAdamW(model, **options)


def add_lora(base: torch.nn.Module, rank: int, seed: int) -> torch.nn.Module:
    """LoRA on every linear map of the blocks; a classifier's head is re-drawn under ``seed`` and trained fully."""
    torch.manual_seed(seed)  # the same LoRA init (and head) for every arm of a seed
    model = copy.deepcopy(base)
    if getattr(model.config, "model_type", None) == "bert":
        from minilm import LORA_TARGETS as BERT_TARGETS

        torch.nn.init.normal_(model.classifier.weight, std=model.config.initializer_range)
        torch.nn.init.zeros_(model.classifier.bias)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=BERT_TARGETS, task_type="SEQ_CLS"
        )  # SEQ_CLS: the classifier trains (modules_to_save)
    else:
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return get_peft_model(model, config)


def train_run(
    base: torch.nn.Module,
    batches: Batches,
    task: Task,
    config: RunConfig,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Fine-tune a copy of ``base`` with ``config.arm``; the base model is left untouched."""
    model = add_lora(base, config.rank, config.seed)
    model.train()
    device = next(model.parameters()).device
    calibration = calibration_batches(batches, task, device) if config.arm == "policy:layerwise_cka" else None
    opt = build_optimizer(model, config, batches.label_words, calibration)
    result = RunResult(config)
    order = random.Random(config.seed)  # the same batches, in the same order, for every arm of a seed
    layer_counts = [0] * len(opt.layer_names) if isinstance(opt, ISTAdamW) else []
    measure_at = min(3, config.steps) if config.measure_memory else -1  # after warm-up; not timed
    start_run = time.perf_counter()
    for step in range(1, config.steps + 1):
        batch = to_device(batches.train_batch(order.sample(task.train, config.batch_size)), device)

        def one_step() -> float:
            if isinstance(opt, ISTAdamW):
                for layer in opt.active_layers:
                    layer_counts[layer] += 1
                for group in opt.param_groups if config.lr_follows_rate else ():
                    layer = group.get("layer")
                    if layer is not None and layer_counts[layer]:  # not trained yet: not stepped either
                        group["lr"] = config.lr * min(config.sparse_lr_scale, step / layer_counts[layer])
            loss = forward_loss(model, batches, batch)
            loss.backward()
            if isinstance(opt, ISTAdamW) and "target" in batch:
                opt.set_loss_inputs(target=batch["target"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        if step == measure_at:
            loss, step_peak = peak_step_bytes(one_step, device)
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            result.peak_bytes = weights + state_bytes_on_device(opt) + step_peak
        else:
            started = time.perf_counter()
            loss = one_step()
            result.step_seconds.append(time.perf_counter() - started)
            result.probe_step.append(
                isinstance(opt, ISTAdamW) and opt.probes_enabled and opt.num_steps % opt.options["probe_interval"] == 0
            )
        result.train_loss.append(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"{config.arm}: training loss is {loss} at step {step}")
        if isinstance(opt, ISTAdamW) and opt.probes_enabled and opt.num_steps % opt.options["probe_interval"] == 0:
            result.importance.append(opt.scheduler.importance.tolist())
            result.importance_steps.append(step)
        if step in config.eval_at:
            result.evals[step] = evaluate(model, batches, task.val)
        if progress is not None:
            progress(1)
    result.seconds = time.perf_counter() - start_run
    result.layer_counts = layer_counts
    result.model = model
    result.optimizer = opt
    return result


def layer_choice_report(opt: torch.optim.Optimizer, batches: Batches, examples: list[Example] | None = None):
    """``opt.importance_report()`` (can layer choice matter here?) on the last training batch, or on ``examples``.

    ``None`` for an arm without IST (``lora``: plain AdamW).
    """
    if not isinstance(opt, ISTAdamW):
        return None
    if examples is None:
        return opt.importance_report()
    batch = to_device(batches.train_batch(examples), next(p for g in opt.param_groups for p in g["params"]).device)
    loss_inputs = None
    if "target" in batch:  # a verbalizer: the forward keeps the last position, the target goes to loss_fn
        loss_inputs = {"target": batch.pop("target")}
        batch["logits_to_keep"] = 1
    return opt.importance_report(batch, loss_inputs=loss_inputs)


def tiny_model(tokens: WordTokenizer, layers: int = 4, hidden: int = 64) -> torch.nn.Module:
    """A config-built LLaMA for smoke tests (random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokens.vocab) + 2,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def tiny_classifier(tokens: WordTokenizer, num_labels: int, layers: int = 4, hidden: int = 64) -> torch.nn.Module:
    """A config-built BERT with a classification head for smoke tests (random weights, dropout off)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokens.vocab) + 2,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    return BertForSequenceClassification(config)
