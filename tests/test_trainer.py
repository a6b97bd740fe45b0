"""Tiny LLaMA + peft LoRA / DoRA: plain loop and HF Trainer, accumulation, save + exact resume."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import lm_batch, tiny_peft_llama

from ist_optim import ISTAdamW

IST_OPTIONS = dict(active_layers=0.5, probe_interval=2, importance_lr=100.0, seed=3)


def dataset(n: int = 24):
    rows = []
    for i in range(n):
        batch = lm_batch(batch=1, seq=8, seed=i)
        rows.append({k: v[0] for k, v in batch.items()})
    return rows


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("dora", [False, True])
def test_plain_loop_lowers_the_loss(dora):
    model = tiny_peft_llama(dora=dora)
    opt = ISTAdamW(model, lr=2e-2, **IST_OPTIONS)
    batch = lm_batch(batch=4, seq=8, seed=0)
    with torch.no_grad():
        start = model(**batch).loss.item()
    for _ in range(30):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        end = model(**batch).loss.item()
    assert end < start - 0.1
    assert opt.scheduler.num_updates == 15 and opt.scheduler.num_skipped == 0


def make_trainer(model, opt, output_dir, max_steps):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=max_steps,
        save_steps=4,
        save_strategy="steps",
        learning_rate=2e-2,
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, None))


@pytest.mark.parametrize("dora, state_policy", [(False, "keep"), (True, "keep"), (False, "offload"), (False, "drop")])
def test_trainer_with_accumulation_and_exact_resume(tmp_path, dora, state_policy):
    model = tiny_peft_llama(dora=dora)
    opt = ISTAdamW(model, lr=2e-2, state_policy=state_policy, **IST_OPTIONS)
    trainer = make_trainer(model, opt, tmp_path / "full", max_steps=8)
    trainer.train()
    assert opt.num_steps == 8 and opt.scheduler.num_updates == 4
    assert os.path.isdir(tmp_path / "full" / "checkpoint-4")

    resumed_model = tiny_peft_llama(dora=dora)
    resumed_opt = ISTAdamW(resumed_model, lr=2e-2, state_policy=state_policy, **{**IST_OPTIONS, "seed": 99})
    resumed = make_trainer(resumed_model, resumed_opt, tmp_path / "resumed", max_steps=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))

    assert resumed_opt.num_steps == 8
    assert torch.equal(resumed_opt.scheduler.importance, opt.scheduler.importance)
    assert resumed_opt.active_layers == opt.active_layers
    final, final_resumed = lora_state(model), lora_state(resumed_model)
    assert final.keys() == final_resumed.keys()
    for name in final:
        assert torch.equal(final[name], final_resumed[name]), name
