"""The quality benchmark's classifier path (MiniLM setting): batches, scoring, LoRA + head, against hand computations."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from finetune import Batches, RunConfig, WordTokenizer, add_lora, evaluate, tiny_classifier, train_run  # noqa: E402
from tasks import Example, Task, weekday_task  # noqa: E402

from ist_optim import ISTAdamW  # noqa: E402


@pytest.fixture(scope="module")
def task():
    return weekday_task(num_train=64, num_eval=24)


def test_classifier_batches_are_prompt_tokens_with_the_answer_index(task):
    tokens = WordTokenizer.for_task(task)
    batches = Batches(tokens, task, max_prompt_tokens=5, head=True)
    assert batches.head and not batches.verbalizer and batches.label_words is None and batches.num_labels == 7
    examples = task.train[:3]
    batch = batches.train_batch(examples)
    assert batch["labels"].tolist() == [ex.answer for ex in examples]
    for row, mask, ex in zip(batch["input_ids"], batch["attention_mask"], examples):
        ids = tokens.encode(ex.prompt)[:5]  # truncation keeps the start (an encoder pools its first token)
        assert row[: len(ids)].tolist() == ids and mask.tolist() == [1] * len(ids) + [0] * (5 - len(ids))


def test_classifier_needs_one_shared_label_set():
    task = Task("mixed", [Example("a", (" x", " y"), 0), Example("b", (" x", " y", " z"), 2)], [], [])
    with pytest.raises(ValueError, match="one set of choices shared by every example"):
        Batches(WordTokenizer.for_task(task), task, head=True)


def test_classifier_lora_trains_blocks_and_a_per_seed_head(task):
    base = tiny_classifier(WordTokenizer.for_task(task), num_labels=7)
    a, b, again = add_lora(base, 4, seed=0), add_lora(base, 4, seed=1), add_lora(base, 4, seed=0)
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert sum(".lora_A." in n for n in trainable) == 4 * 6  # query, key, value and three dense maps per block
    assert not any("pooler" in n for n in trainable) and any("classifier" in n for n in trainable)
    head = {n: p for n, p in a.named_parameters() if "classifier" in n and p.requires_grad}
    head_b = dict(b.named_parameters())
    head_again = dict(again.named_parameters())
    name = next(n for n in head if n.endswith("weight"))
    assert not torch.equal(head[name], head_b[name]) and torch.equal(head[name], head_again[name])
    opt = ISTAdamW(a, lr=1e-3)
    assert [n.split("model.")[-1] for n in opt.layer_names] == [f"bert.encoder.layer.{i}" for i in range(4)]


def test_classifier_evaluate_matches_a_hand_computed_argmax_and_loss(task):
    tokens = WordTokenizer.for_task(task)
    batches = Batches(tokens, task, head=True)
    model = add_lora(tiny_classifier(tokens, num_labels=7), 4, seed=0)
    got = evaluate(model, batches, task.val, batch_size=5)  # several chunks, one ragged
    with torch.no_grad():
        logits = torch.cat(
            [model(**{k: v for k, v in batches.train_batch([ex]).items() if k != "labels"}).logits for ex in task.val]
        ).double()
    target = torch.tensor([ex.answer for ex in task.val])
    assert got["accuracy"] == (logits.argmax(-1) == target).double().mean().item()
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-5)


def test_classifier_run_trains_head_every_step_and_ist_layers_sparsely(task):
    tokens = WordTokenizer.for_task(task)
    batches = Batches(tokens, task, head=True)
    base = tiny_classifier(tokens, num_labels=7)
    config = RunConfig("ist", steps=4, batch_size=8, probe_interval=2, eval_at=(4,), measure_memory=False)
    result = train_run(base, batches, task, config)
    assert result.layer_counts and sum(result.layer_counts) == 4 * 1  # 25% of 4 blocks: one a step
    init = add_lora(base, config.rank, config.seed)
    trained = dict(result.model.named_parameters())
    for name, p in init.named_parameters():
        if "classifier" in name and p.requires_grad:
            assert not torch.equal(p, trained[name]), f"{name} did not train"


def test_continuation_loss_on_the_kept_positions_equals_the_full_loss():
    """Causal-LM answers (commonsense, --data): left-padded with logits_to_keep, the loss is the answers' mean NLL."""
    from finetune import forward_loss, tiny_model

    task = Task(
        "mc",
        [
            Example("q one two", (" yes sir", " no"), 0),
            Example("q three", (" yes sir", " no"), 1),
            Example("q four five six seven", (" maybe so so", " no"), 0),
        ],
        [],
        [],
    )
    tokens = WordTokenizer.for_task(task)
    batches = Batches(tokens, task)
    assert not batches.verbalizer  # multi-token answers: a continuation task
    model = tiny_model(tokens).double().eval()
    batch = batches.train_batch(task.train)
    assert batch["logits_to_keep"] == 4 and batch["labels"].shape == (3, 4)  # longest answer (3 tokens) + 1
    with torch.no_grad():
        loss = forward_loss(model, batches, batch)
        nll, count = 0.0, 0  # by hand: each row alone, unpadded, full logits
        for ex in task.train:
            prompt, answer = tokens.encode(ex.prompt), tokens.encode(ex.choices[ex.answer])
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0]
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
            nll -= logp.gather(-1, torch.tensor(answer)[:, None]).sum().item()
            count += len(answer)
    assert loss.item() == pytest.approx(nll / count, rel=1e-6)  # HF's loss casts the logits to float32


def test_continuation_evaluate_scores_each_choice_by_its_summed_log_likelihood():
    from finetune import tiny_model

    examples = [Example("q one two", (" yes sir", " no", " maybe so so"), i % 3) for i in range(4)]
    examples += [Example("q three four five", (" no", " yes sir"), i % 2) for i in range(3)]
    task = Task("mc", examples, [], [])
    tokens = WordTokenizer.for_task(task)
    batches = Batches(tokens, task)
    model = tiny_model(tokens).double().eval()
    got = evaluate(model, batches, examples, batch_size=3)  # chunks that mix choice counts and answer lengths
    correct, losses = 0, []
    with torch.no_grad():
        for ex in examples:
            prompt, scores = tokens.encode(ex.prompt), []
            for choice in ex.choices:
                answer = tokens.encode(choice)
                logp = torch.log_softmax(
                    model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1], -1
                )
                scores.append((logp.gather(-1, torch.tensor(answer)[:, None]).sum().item(), len(answer)))
            correct += max(range(len(scores)), key=lambda i: scores[i][0]) == ex.answer
            losses.append(-scores[ex.answer][0] / scores[ex.answer][1])
    assert got["accuracy"] == correct / len(examples)
    assert got["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)  # evaluate scores in float32


def test_sparse_lr_scale_leaves_the_every_step_head_at_loras_lr(task):
    from finetune import build_optimizer

    model = add_lora(tiny_classifier(WordTokenizer.for_task(task), num_labels=7), 4, seed=0)
    opt = build_optimizer(model, RunConfig("random", lr=1e-3, sparse_lr_scale=4.0), None)
    head = {id(p) for n, p in model.named_parameters() if p.requires_grad and "classifier" in n}
    lrs = {id(p): group["lr"] for group in opt.param_groups for p in group["params"]}
    assert head and all(lrs[i] == 1e-3 for i in head)
    assert {lr for i, lr in lrs.items() if i not in head} == {4e-3}  # the blocks' adapters: lr x4


def test_lr_follows_rate_gives_each_layer_lr_times_min_of_scale_and_inverse_rate():
    from finetune import tiny_model

    task = weekday_task(num_train=64, num_eval=8)
    tokens = WordTokenizer.for_task(task)
    batches = Batches(tokens, task)
    config = RunConfig(
        "ist-paper",
        steps=9,
        batch_size=4,
        lr=1e-3,
        sparse_lr_scale=4.0,
        probe_interval=3,
        importance_lr=100.0,
        lr_follows_rate=True,
        measure_memory=False,
    )
    result = train_run(tiny_model(tokens), batches, task, config)
    opt = result.optimizer
    assert len(opt.param_groups) == 4 and sum(result.layer_counts) == 9  # one group per block; 1 of 4 a step
    for layer, group in enumerate(opt.param_groups):
        count = result.layer_counts[layer]
        if count:  # every trained layer's lr is set at each step: at the last, steps so far = 9
            assert group["lr"] == pytest.approx(1e-3 * min(4.0, 9 / count), rel=1e-12)
    assert any(4.0 > 9 / c for c in result.layer_counts if c)  # 9 draws of 4 layers: one trained 3+ times, below x4
