"""Backward cut, state eviction and selective checkpointing, each against its plain reference."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import lm_batch, tiny_llama, tiny_peft_llama
from torch import nn

from ist_optim import ISTAdamW

CHECKPOINTING = ["none", "input_grads", "reentrant", "non_reentrant"]


def prepare(model: nn.Module, checkpointing: str) -> nn.Module:
    base = model.get_base_model()
    if checkpointing == "input_grads":
        base.enable_input_require_grads()
    elif checkpointing in ("reentrant", "non_reentrant"):
        base.activation_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
    return model


def blocks_of(model):
    return model.get_base_model().model.layers


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def record_backward_reach(model) -> list[int]:
    """Indices of blocks whose output received a gradient in backward."""
    reached: list[int] = []

    def watch(index):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if out.requires_grad:
                out.register_hook(lambda grad: reached.append(index))

        return hook

    for index, block in enumerate(blocks_of(model)):
        block.register_forward_hook(watch(index))
    return reached


@pytest.mark.parametrize("checkpointing", CHECKPOINTING)
def test_backward_cut_gives_the_full_backward_grads_and_never_runs_below(checkpointing):
    model = prepare(tiny_peft_llama(num_layers=4), checkpointing)
    reference = prepare(tiny_peft_llama(num_layers=4), checkpointing)
    opt = ISTAdamW(model, lr=1e-2, active_layers=2, num_probes=0)
    ref_opt = ISTAdamW(reference, lr=1e-2, active_layers=2, num_probes=0, backward_cut=False)
    reached, ref_reached = record_backward_reach(model), record_backward_reach(reference)
    for selection in ([2, 3], [1, 3], [0, 2]):
        opt._set_selection(selection)
        ref_opt._set_selection(selection)
        reached.clear()
        ref_reached.clear()
        batch = lm_batch(seed=sum(selection))
        model(**batch).loss.backward()
        reference(**batch).loss.backward()
        grads, ref_grads = grads_of(model), grads_of(reference)
        assert grads.keys() == ref_grads.keys()
        assert {int(n.split(".layers.")[1].split(".")[0]) for n in grads} == set(selection)
        for name in grads:
            assert torch.equal(grads[name], ref_grads[name]), name
        lowest = selection[0]
        assert min(reached) == lowest, reached  # no block below the lowest selected one runs backward
        if checkpointing != "none":  # something upstream requires grad: without the cut, backward goes down
            assert min(ref_reached) == 0
        opt.zero_grad()
        ref_opt.zero_grad()
    # plain: nothing below the selected blocks requires grad, so there is nothing to cut
    assert opt.hooks.cut_count == (3 if checkpointing != "none" else 0)


def test_cut_is_off_when_a_trained_embedding_runs_before_the_blocks():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(4), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    reference = copy.deepcopy(model)
    opt = ISTAdamW(model, lr=1e-2, active_layers=1, num_probes=0)
    ref_opt = ISTAdamW(reference, lr=1e-2, active_layers=1, num_probes=0, backward_cut=False)
    opt._set_selection([2])
    ref_opt._set_selection([2])
    batch = lm_batch()
    with pytest.warns(UserWarning, match="backward cut skipped"):
        model(**batch).loss.backward()
    reference(**batch).loss.backward()
    grads, ref_grads = grads_of(model), grads_of(reference)
    assert any("embed_tokens" in n for n in grads)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    assert opt.hooks.cut_count == 0


def train(model, opt, steps, seed=0):
    for step in range(steps):
        model(**lm_batch(seed=seed + step)).loss.backward()
        opt.step()
        opt.zero_grad()


def state_equal(opt_a, opt_b):
    for p, q in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for key in opt_a.state[p]:
            assert torch.equal(opt_a.state[p][key].cpu(), opt_b.state[q][key].cpu())


OPTIONS = dict(lr=1e-2, weight_decay=0.05, active_layers=1, probe_interval=3, importance_lr=100.0, seed=2)


class HostCopy(torch.Tensor):
    """Marks the evictor's host copies. On a CPU-only run offload copies CPU to CPU, so a missing restore
    would not change the trajectory; here ``.to(device)`` returns a plain tensor, as a host-to-CUDA copy does."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {})).clone()
        return super().__torch_function__(func, types, args, kwargs)


def mark_host_copies(monkeypatch) -> None:
    from ist_optim import eviction

    to_host = eviction._to_host
    monkeypatch.setattr(eviction, "_to_host", lambda tensor: to_host(tensor).as_subclass(HostCopy))


def assert_state_is_resident_exactly_for_the_selected_layers(opt) -> None:
    """The layers about to train step device tensors; the others' state lives in the evictor's host copies."""
    assert opt.evictor.evicted == {i for i in range(len(opt.layer_map)) if i not in opt.active_layers}
    for layer, params in enumerate(opt.layer_map.params):
        for p in params:
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    assert isinstance(value, HostCopy) == (layer in opt.evictor.evicted), (layer, key)


def test_offload_equals_keep_bit_for_bit_with_changing_selections(monkeypatch):
    mark_host_copies(monkeypatch)
    model, reference = tiny_peft_llama(num_layers=4), tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, state_policy="offload", **OPTIONS)
    ref_opt = ISTAdamW(reference, state_policy="keep", **OPTIONS)
    selections = set()
    for step in range(24):
        selections.add(tuple(opt.active_layers))
        train(model, opt, 1, seed=step)
        train(reference, ref_opt, 1, seed=step)
        assert opt.active_layers == ref_opt.active_layers
        assert_state_is_resident_exactly_for_the_selected_layers(opt)
    assert len(selections) == 4
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    state_equal(opt, ref_opt)
    assert torch.equal(opt.scheduler.importance, ref_opt.scheduler.importance)


def per_layer_state_bytes(opt, layer):
    return sum(
        v.numel() * v.element_size()
        for p in opt.layer_map.params[layer]
        for v in opt.state[p].values()
        if isinstance(v, torch.Tensor)
    )


@pytest.mark.parametrize("policy", ["offload", "drop"])
def test_device_state_bytes_follow_the_selected_layers(policy, monkeypatch):
    mark_host_copies(monkeypatch)
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, state_policy=policy, **{**OPTIONS, "active_layers": 2, "num_probes": 0})
    keep_model = tiny_peft_llama(num_layers=4)
    keep = ISTAdamW(keep_model, state_policy="keep", **{**OPTIONS, "active_layers": 2, "num_probes": 0})
    train(keep_model, keep, 12)
    layer_bytes = per_layer_state_bytes(keep, 0)  # every layer has the same adapters
    assert all(per_layer_state_bytes(keep, layer) == layer_bytes for layer in range(4))  # all were trained
    assert keep.memory_report()["optimizer_state_device_bytes"] == 4 * layer_bytes

    train(model, opt, 12)
    report = opt.memory_report()
    resident = [layer for layer in range(4) if layer not in opt.evictor.evicted]
    assert resident == opt.active_layers
    assert report["optimizer_state_device_bytes"] == sum(per_layer_state_bytes(opt, layer) for layer in resident)
    assert report["optimizer_state_device_bytes"] <= 2 * layer_bytes
    evicted_bytes = sum(per_layer_state_bytes(opt, layer) for layer in opt.evictor.evicted)
    assert report["optimizer_state_host_bytes"] == evicted_bytes
    if policy == "offload":
        assert report["optimizer_state_device_bytes"] == 2 * layer_bytes
        assert report["optimizer_state_host_bytes"] == 2 * layer_bytes
        assert_state_is_resident_exactly_for_the_selected_layers(opt)
    else:
        assert evicted_bytes == 0
    assert report["grad_bytes"] == 0  # after zero_grad
    model(**lm_batch()).loss.backward()
    grads = opt.memory_report()["grad_bytes"]
    assert grads == sum(p.numel() * 4 for layer in opt.active_layers for p in opt.layer_map.params[layer])


@pytest.mark.parametrize("policy", ["offload", "drop"])
def test_resume_while_layers_are_evicted_is_bit_identical(policy, monkeypatch):
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, state_policy=policy, **OPTIONS)
    train(model, opt, 7)
    assert opt.evictor.evicted
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    mark_host_copies(monkeypatch)  # after saving: weights_only loading refuses tensor subclasses
    resumed_model = tiny_peft_llama(num_layers=4, seed=5)
    resumed_model.load_state_dict(model.state_dict())
    resumed = ISTAdamW(resumed_model, state_policy=policy, **{**OPTIONS, "seed": 42})
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.evictor.evicted == opt.evictor.evicted
    assert resumed.memory_report() == opt.memory_report()
    train(model, opt, 10, seed=100)
    for step in range(10):
        train(resumed_model, resumed, 1, seed=100 + step)
        if policy == "offload":
            assert_state_is_resident_exactly_for_the_selected_layers(resumed)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    state_equal(opt, resumed)


def test_drop_restarts_the_moments_of_layers_that_come_back():
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, state_policy="drop", **{**OPTIONS, "num_probes": 0})
    streak = [0] * 4  # consecutive steps each layer has trained up to now
    trained, comebacks = set(), 0
    for _ in range(16):
        active = opt.active_layers
        for layer, params in enumerate(opt.layer_map.params):
            if layer in active and streak[layer]:  # selected again: its moments continue
                assert all(int(opt.state[p]["step"]) == streak[layer] for p in params), layer
            else:  # not selected, or coming back after a break: nothing kept, AdamW starts at step 1
                assert not any(p in opt.state for p in params), layer
                comebacks += layer in active and layer in trained
        train(model, opt, 1)
        trained.update(active)
        streak = [streak[layer] + 1 if layer in active else 0 for layer in range(4)]
    assert comebacks >= 2


def count_forwards(model):
    """Forwards through each block's MLP (a recompute calls the block's forward, not its hooks)."""
    calls = [0] * len(blocks_of(model))

    def hook(index):
        def fn(module, args):
            calls[index] += 1

        return fn

    for index, block in enumerate(blocks_of(model)):
        block.mlp.register_forward_pre_hook(hook(index))
    return calls


# A recomputed block runs without the KV cache, so it attends over other memory layouts of K/V than the
# stored forward (the cache's concatenated copies); BLAS may round the two differently (GPT-2 differs by
# one ulp in float32 on an AMD EPYC). Portable: float64 and a tight tolerance.
RECOMPUTE_TOLERANCE = dict(rtol=1e-10, atol=1e-12)


def test_selective_checkpointing_recomputes_only_unselected_blocks_above_and_keeps_grads():
    model = tiny_peft_llama(num_layers=4, dtype=torch.float64)
    reference = tiny_peft_llama(num_layers=4, dtype=torch.float64)
    opt = ISTAdamW(model, lr=1e-2, active_layers=2, num_probes=0, checkpoint_unselected=True)
    ref_opt = ISTAdamW(reference, lr=1e-2, active_layers=2, num_probes=0)
    calls = count_forwards(model)
    opt._set_selection([1, 3])
    ref_opt._set_selection([1, 3])
    batch = lm_batch()
    model(**batch).loss.backward()
    reference(**batch).loss.backward()
    assert calls == [1, 1, 2, 1]  # block 2 (unselected, above 1) ran again in backward; 0 is below the cut
    grads, ref_grads = grads_of(model), grads_of(reference)
    torch.testing.assert_close(grads, ref_grads, **RECOMPUTE_TOLERANCE)  # same keys; names the one that differs
    opt.remove_hooks()
    assert all("forward" not in vars(block) for block in blocks_of(model))


def test_selective_checkpointing_trains_like_storing_everything():
    model, reference = (tiny_peft_llama(num_layers=4, dtype=torch.float64) for _ in range(2))
    opt = ISTAdamW(model, checkpoint_unselected=True, **OPTIONS)
    ref_opt = ISTAdamW(reference, **OPTIONS)
    train(model, opt, 12)
    train(reference, ref_opt, 12)
    assert opt.active_layers == ref_opt.active_layers
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, **RECOMPUTE_TOLERANCE)


def test_bad_memory_options_raise():
    with pytest.raises(ValueError, match="state_policy"):
        ISTAdamW(tiny_peft_llama(), lr=1e-3, state_policy="disk")
    with pytest.raises(TypeError, match="checkpoint_unselected"):
        ISTAdamW(tiny_peft_llama(), lr=1e-3, checkpoint_unselected="yes")
    model = tiny_peft_llama()
    with pytest.raises(ValueError, match="layer_of"):
        ISTAdamW(model, lr=1e-3, layer_of=lambda n: 0 if "lora" in n else None, num_probes=0, backward_cut=True)


def test_selective_checkpointing_on_gpt2_with_its_kv_cache_keeps_grads():
    """GPT-2 builds a KV cache even in training; a recomputed block must not append to it twice."""
    from test_layers import gpt2

    model, reference = gpt2(4, "eager").double(), gpt2(4, "eager").double()
    reference.load_state_dict(model.state_dict())
    opt = ISTAdamW(model, lr=1e-2, active_layers=2, num_probes=0, checkpoint_unselected=True)
    ref_opt = ISTAdamW(reference, lr=1e-2, active_layers=2, num_probes=0)
    opt._set_selection([0, 3])
    ref_opt._set_selection([0, 3])
    ids = torch.randint(0, 64, (2, 8))
    torch.manual_seed(0)  # GPT-2 has dropout: same draws on both sides (checkpoint replays its own)
    model(input_ids=ids, labels=ids).loss.backward()
    torch.manual_seed(0)
    reference(input_ids=ids, labels=ids).loss.backward()
    grads, ref_grads = grads_of(model), grads_of(reference)
    assert grads
    torch.testing.assert_close(grads, ref_grads, **RECOMPUTE_TOLERANCE)


class KwargBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, hidden_states):
        return hidden_states + torch.tanh(self.fc(hidden_states))


class KwargNet(nn.Module):
    """Blocks called with ``hidden_states=`` as a keyword, input requiring grad from upstream."""

    def __init__(self, width: int = 8, depth: int = 4):
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.layers = nn.ModuleList(KwargBlock(width) for _ in range(depth))

    def get_input_embeddings(self):  # HF's convention: the one leaf the cut may drop
        return self.embed

    def forward(self, x):
        hidden = self.embed(x).requires_grad_()  # like enable_input_require_grads
        for layer in self.layers:
            hidden = layer(hidden_states=hidden)
        return hidden.pow(2).mean()


def test_backward_cut_on_a_hidden_states_keyword():
    torch.manual_seed(0)
    model = KwargNet()
    model.embed.requires_grad_(False)
    reference = copy.deepcopy(model)
    opt = ISTAdamW(model, lr=1e-2, active_layers=2, num_probes=0)
    ref_opt = ISTAdamW(reference, lr=1e-2, active_layers=2, num_probes=0, backward_cut=False)
    opt._set_selection([2, 3])
    ref_opt._set_selection([2, 3])
    x = torch.randn(3, 8)
    model(x).backward()
    reference(x).backward()
    assert opt.hooks.cut_count == 1
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
