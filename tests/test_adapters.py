"""ist_optim's series and parallel bottleneck adapters: forward, suppression, and IST training them in HF models."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, lm_batch, tiny_llama
from torch import nn

from ist_optim import ISTAdamW, ParallelAdapter, SeriesAdapter, add_adapters, suppress
from ist_optim.probes import probe_losses


def randomize_up(module: nn.Module) -> None:
    """Freshly inserted adapters add nothing (up is zero); give them something to suppress."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "adapter_up" in name:
                p.normal_(0, 0.5)


def reference(kind: str, module, x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    down, up, base = module.adapter_down.weight, module.adapter_up.weight, module.base_layer
    delta = lambda h: scale * (torch.tanh(h @ down.T) @ up.T)  # noqa: E731
    if kind == "parallel":
        return base(x) + delta(x)
    if kind == "series_input":
        return base(x + delta(x))
    h = base(x)
    return h + delta(h)


def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    if kind == "parallel":
        module = ParallelAdapter(base, bottleneck=3, scale=0.7)
    else:
        module = SeriesAdapter(base, bottleneck=3, scale=0.7, position=kind.split("_")[1])
    randomize_up(module)
    return module


KINDS = ["parallel", "series_output", "series_input"]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_the_hand_written_formula(kind):
    module = make(kind)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference(kind, module, x, 0.7), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_adapter_leaves_the_output_unchanged(kind):
    base = nn.Linear(6, 5)
    module = (
        ParallelAdapter(base, bottleneck=3)
        if kind == "parallel"
        else SeriesAdapter(base, bottleneck=3, position=kind.split("_")[1])
    )
    x = torch.randn(4, 6)
    assert torch.equal(module(x), base(x))


@pytest.mark.parametrize("kind", KINDS)
def test_suppression_scales_exactly_the_adapter_contribution(kind):
    module = make(kind)
    x = torch.randn(4, 6, dtype=torch.float64)
    with suppress([[module]], torch.tensor([0.25], dtype=torch.float64)):
        suppressed = module(x)
    torch.testing.assert_close(suppressed, reference(kind, module, x, 0.7 * 0.25), rtol=1e-12, atol=1e-12)
    # per-row betas (batched probes): rows 0-1 keep 1.0, rows 2-3 keep 0.25
    with suppress([[module]], torch.tensor([[1.0], [0.25]], dtype=torch.float64)):
        batched = module(x)
    expected = torch.cat([reference(kind, module, x[:2], 0.7), reference(kind, module, x[2:], 0.7 * 0.25)])
    torch.testing.assert_close(batched, expected, rtol=1e-12, atol=1e-12)
    assert module.scale == 0.7  # restored
    torch.testing.assert_close(module(x), reference(kind, module, x, 0.7), rtol=1e-12, atol=1e-12)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=4, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


SETUPS = {
    # LLM-Adapters' LLaMA placements: series before gate/up and after down; parallel beside up/down
    "llama_series": (lambda: tiny_llama(4), [("series", ["down_proj"], "output"), ("series", ["up_proj"], "input")]),
    "llama_parallel": (lambda: tiny_llama(4), [("parallel", ["up_proj", "down_proj"], "output")]),
    "gpt2_parallel": (tiny_gpt2, [("parallel", r".*\.mlp\.c_fc", "output")]),
}


@pytest.mark.parametrize("setup", SETUPS)
def test_ist_trains_the_adapters_inserted_into_hf_models(setup):
    build, insertions = SETUPS[setup]
    model = build().double()
    for index, (kind, targets, position) in enumerate(insertions):
        wrapped = add_adapters(model, targets, kind, bottleneck=4, position=position, freeze_base=index == 0)
        assert len(wrapped) == 4 * (len(targets) if isinstance(targets, list) else 1)
    randomize_up(model)
    assert all("adapter_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = ISTAdamW(model, lr=1e-2, active_layers=2, probe_interval=2, importance_lr=100.0)
    assert len(opt.layer_names) == 4 and all(len(mods) >= 1 for mods in opt.adapters)
    batch = lm_batch(batch=2, seq=8)
    with torch.no_grad():
        start = model(**batch).loss.item()
    for _ in range(6):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        selected = list(opt.active_layers)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        trained = {
            opt.layer_names.index(name)
            for name in opt.layer_names
            for n, p in model.named_parameters()
            if n.startswith(name + ".") and not torch.equal(p, before[n])
        }
        assert trained == set(selected)
    with torch.no_grad():
        assert model(**batch).loss.item() < start
    assert opt.scheduler.num_updates == 3 and not torch.equal(opt.scheduler.importance, torch.zeros(4))
    beta = torch.tensor([[1.0, 0.25, 1.0, 0.25], [0.25, 1.0, 0.25, 1.0]], dtype=torch.float64)
    sequential = probe_losses(model, opt.adapters, beta, batch=opt.hooks.probe_batch, mode="sequential")
    batched = probe_losses(model, opt.adapters, beta, batch=opt.hooks.probe_batch, mode="batched")
    torch.testing.assert_close(batched, sequential, rtol=1e-10, atol=1e-12)
    assert sequential[0] != sequential[1]  # suppression changed the loss


def test_add_adapters_rejects_what_it_cannot_do():
    model = tiny_llama(2)
    with pytest.raises(ValueError, match="no module"):
        add_adapters(model, ["no_such_proj"])
    add_adapters(model, ["up_proj"], "parallel", bottleneck=2)
    with pytest.raises(ValueError, match="already wrapped"):
        add_adapters(model, ["up_proj"], "series", bottleneck=2)
    with pytest.raises(ValueError, match="kind"):
        add_adapters(model, ["down_proj"], "lora")
    with pytest.raises(ValueError, match="position"):
        add_adapters(model, ["down_proj"], "parallel", position="input")
    with pytest.raises(TypeError, match="features"):
        ParallelAdapter(nn.ReLU())
