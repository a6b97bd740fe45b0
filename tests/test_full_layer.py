"""Full-layer mode: every parameter of the selected blocks trains, no adapters; probes scale the blocks' residuals."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, tiny_llama

from ist_optim import ISTAdamW
from ist_optim.probes import probe_losses
from ist_optim.suppression import BlockResidual, suppress


def full_model(freeze_outside: bool = True):
    model = tiny_llama(4).double()
    if freeze_outside:  # LISA trains embeddings and head every step; here they are frozen so the cut applies
        model.model.embed_tokens.requires_grad_(False)
        model.model.norm.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    return model


def test_all_layers_active_equals_plain_adamw_full_fine_tuning_bit_for_bit():
    model, reference = full_model(freeze_outside=False), full_model(freeze_outside=False)
    opt = ISTAdamW(model, lr=1e-3, weight_decay=0.01, active_layers=1.0, num_probes=0)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.01)
    for step in range(5):
        for m, o in ((model, opt), (reference, ref_opt)):
            m(**lm_batch(seed=step)).loss.backward()
            o.step()
            o.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_only_selected_blocks_change_and_backward_is_cut():
    model = full_model()
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, probe_interval=2, state_policy="drop")
    for step in range(6):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        selected = opt.active_layers
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        moved = {
            int(n.split(".layers.")[1].split(".")[0])
            for n, p in model.named_parameters()
            if not torch.equal(p, before[n]) and ".layers." in n
        }
        assert moved == set(selected)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if ".layers." not in n)
    assert opt.scheduler.num_updates == 3
    assert opt.memory_report()["backward_cuts"] > 0


@pytest.mark.parametrize("beta", [0.0, 0.25])
def test_block_residual_suppression_is_exact(beta):
    model = full_model()
    opt = ISTAdamW(model, lr=1e-2, probe_interval=1)
    assert all(isinstance(mods[0], BlockResidual) for mods in opt.adapters)
    seen = {}  # block 1's input and, as block 2's input, its (suppressed) output
    model.model.layers[1].register_forward_pre_hook(lambda m, args: seen.update(inp=args[0]))
    model.model.layers[2].register_forward_pre_hook(lambda m, args: seen.update(out=args[0]))
    batch = lm_batch()
    with torch.no_grad():
        model(**batch)
        plain_in, plain_out = seen["inp"], seen["out"]
        betas = torch.ones(4, dtype=torch.float64)
        betas[1] = beta
        with suppress(opt.adapters, betas):
            model(**batch)
    torch.testing.assert_close(seen["inp"], plain_in, rtol=0, atol=0)  # blocks below are untouched
    torch.testing.assert_close(seen["out"], plain_in + beta * (plain_out - plain_in), rtol=1e-12, atol=1e-12)
    # batched probes equal sequential ones
    model(**batch).loss.backward()
    candidates = torch.tensor([[1.0, 0.25, 1.0, 0.25], [0.25, 1.0, 0.25, 1.0]], dtype=torch.float64)
    sequential = probe_losses(model, opt.adapters, candidates, batch=opt.hooks.probe_batch, mode="sequential")
    batched = probe_losses(model, opt.adapters, candidates, batch=opt.hooks.probe_batch, mode="batched")
    torch.testing.assert_close(batched, sequential, rtol=1e-10, atol=1e-12)
    assert sequential[0] != sequential[1]
