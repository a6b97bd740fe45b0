"""Every peft tuner whose layers follow the ``base_layer`` convention: IST trains it, and suppression is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, tiny_llama

from ist_optim import ISTAdamW, suppress
from ist_optim.probes import probe_losses

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tuner_config(name: str):
    import peft

    if name == "lora":
        return peft.LoraConfig(r=2, target_modules=TARGETS)
    if name == "dora":
        return peft.LoraConfig(r=2, target_modules=TARGETS, use_dora=True)
    if name == "loha":
        return peft.LoHaConfig(r=2, target_modules=TARGETS)
    if name == "lokr":
        return peft.LoKrConfig(r=2, target_modules=TARGETS)
    if name == "ia3":
        return peft.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"])
    if name == "vera":
        return peft.VeraConfig(r=2, target_modules=["q_proj", "v_proj"])
    raise ValueError(name)


TUNERS = ["lora", "dora", "loha", "lokr", "ia3", "vera"]


def build(name: str):
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(4), tuner_config(name)).double()
    torch.manual_seed(5)
    with torch.no_grad():  # every tuner starts as the identity; move it so suppression has an effect
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("name", TUNERS)
def test_suppression_scales_each_tuner_delta_exactly(name):
    model = build(name)
    opt = ISTAdamW(model, lr=1e-2, num_probes=2, probe_interval=1)
    assert all(opt.adapters), opt.adapters
    module = opt.adapters[1][0]
    x = torch.randn(2, 3, module.base_layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        base, full = module.base_layer(x), module(x)
        beta = torch.ones(len(opt.layer_names), dtype=torch.float64)
        beta[1] = 0.25
        with suppress(opt.adapters, beta):
            suppressed = module(x)
    assert not torch.allclose(full, base)
    torch.testing.assert_close(suppressed, base + 0.25 * (full - base), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", TUNERS)
def test_ist_trains_each_tuner_and_batched_probes_match(name):
    model = build(name)
    opt = ISTAdamW(model, lr=1e-2, active_layers=2, probe_interval=2, importance_lr=100.0)
    batch = lm_batch()
    for _ in range(4):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or "vera" in n}
        selected = list(opt.active_layers)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        moved = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
        layers = {i for i, lname in enumerate(opt.layer_names) for n in moved if n.startswith(lname + ".")}
        assert layers == set(selected), (moved, selected)
    assert opt.scheduler.num_updates == 2
    beta = torch.tensor([[1.0, 0.25, 1.0, 0.25], [0.25, 1.0, 0.25, 1.0]], dtype=torch.float64)
    sequential = probe_losses(model, opt.adapters, beta, batch=opt.hooks.probe_batch, mode="sequential")
    batched = probe_losses(model, opt.adapters, beta, batch=opt.hooks.probe_batch, mode="batched")
    torch.testing.assert_close(batched, sequential, rtol=1e-10, atol=1e-12)


def test_adalora_is_refused_at_construction():
    from peft import AdaLoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(4), AdaLoraConfig(r=2, target_modules=TARGETS, total_step=10))
    with pytest.raises(ValueError, match="AdaLoRA"):
        ISTAdamW(model, lr=1e-2)
