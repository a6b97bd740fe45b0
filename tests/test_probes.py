"""Suppression probes against hand-made references; batched vs sequential; exact restore."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, lm_batch, tiny_peft_llama
from torch import nn

from ist_optim import IST, ISTAdamW, discover_layers, find_adapter_modules, suppress
from ist_optim.probes import probe_losses


def adapters_of(model):
    params = [p for p in model.parameters() if p.requires_grad]
    layer_map = discover_layers(model, params)
    return layer_map, find_adapter_modules(model, layer_map.params)


def hf_loss(model, batch):
    with torch.no_grad():
        return model(**batch).loss.double()


class HandSuppressed(nn.Module):
    """Reference: ``base(x) + beta * (adapter_module(x) - base(x))``, built by module replacement."""

    def __init__(self, module: nn.Module, beta: float):
        super().__init__()
        self.module, self.beta = module, beta

    def forward(self, x, *args, **kwargs):
        base = self.module.base_layer(x)
        return base + self.beta * (self.module(x, *args, **kwargs) - base)


def replace_module(root: nn.Module, target: nn.Module, new: nn.Module) -> None:
    for name, module in root.named_modules():
        for child_name, child in module.named_children():
            if child is target:
                setattr(module, child_name, new)
                return
    raise AssertionError("module not found")


def tiny_peft_llama_lora_bias(num_layers: int = 4, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """conftest's tiny peft LLaMA with ``lora_bias=True`` (a bias in each ``lora_B``; peft needs biased base layers)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,
        mlp_bias=True,
    )
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=targets)
    model = get_peft_model(LlamaForCausalLM(config).to(dtype), lora)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # weight and bias: non-zero so the adapters matter
                p.normal_(0, 0.1)
    return model


BETA = torch.tensor([[1.0, 0.25, 0.25, 1.0], [0.25, 1.0, 0.0, 0.25], [0.25, 0.25, 1.0, 1.0]], dtype=torch.float64)


@pytest.mark.parametrize("variant", ["lora", "rslora", "lora_bias"])
def test_suppressed_lora_forward_equals_scaling_lora_b_by_hand(variant):
    """LoRA's term is linear in lora_B (weight and bias): lora_B scaled by beta where suppressed is the reference."""
    if variant == "lora_bias":
        model = tiny_peft_llama_lora_bias(dtype=torch.float64).eval()
    else:
        model = tiny_peft_llama(rslora=variant == "rslora", dtype=torch.float64).eval()
    layer_map, adapters = adapters_of(model)
    batch = lm_batch(seed=3)
    for row in BETA:
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for layer, beta in enumerate(row.tolist()):
                for name, p in reference.named_parameters():
                    if f"layers.{layer}." in name and "lora_B" in name:  # lora_B's weight and bias
                        p.mul_(beta)
        with suppress(adapters, row):
            got = hf_loss(model, batch)
        torch.testing.assert_close(got, hf_loss(reference, batch), rtol=1e-12, atol=1e-12)
        assert not torch.equal(got, hf_loss(model, batch))  # it did change something


def test_suppressed_dora_forward_equals_hand_scaled_delta():
    model = tiny_peft_llama(dora=True, dtype=torch.float64).eval()
    layer_map, adapters = adapters_of(model)
    assert all(len(mods) == 5 for mods in adapters)
    batch = lm_batch(seed=4)
    for row in BETA:
        reference = copy.deepcopy(model)
        _, ref_adapters = adapters_of(reference)
        for layer, beta in enumerate(row.tolist()):
            if beta != 1.0:
                for module in ref_adapters[layer]:
                    replace_module(reference, module, HandSuppressed(module, beta))
        with suppress(adapters, row):
            got = hf_loss(model, batch)
        torch.testing.assert_close(got, hf_loss(reference, batch), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dora", [False, True])
def test_batched_probes_equal_sequential(dora):
    model = tiny_peft_llama(dora=dora, dtype=torch.float64)
    _, adapters = adapters_of(model)
    batch = ((), lm_batch(batch=3, seed=5))
    sequential = probe_losses(model, adapters, BETA, batch=batch, mode="sequential")
    batched = probe_losses(model, adapters, BETA, batch=batch, mode="batched")
    assert len(set(sequential.tolist())) == 3
    torch.testing.assert_close(batched, sequential, rtol=1e-10, atol=1e-12)


def test_batched_probes_equal_sequential_with_a_user_loss_fn_float32():
    model = tiny_peft_llama()
    _, adapters = adapters_of(model)

    def loss_fn(output, input_ids, attention_mask, labels):
        logits = output.logits[:, :-1].float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))

    batch = ((), {k: v for k, v in lm_batch(batch=2, seed=6).items()})
    sequential = probe_losses(model, adapters, BETA, batch=batch, loss_fn=loss_fn, mode="sequential")
    batched = probe_losses(model, adapters, BETA, batch=batch, loss_fn=loss_fn, mode="batched")
    torch.testing.assert_close(batched, sequential, rtol=1e-5, atol=1e-6)
    # and the user loss is the HF loss here
    torch.testing.assert_close(sequential, probe_losses(model, adapters, BETA, batch=batch), rtol=1e-6, atol=1e-6)


def test_probes_restore_everything_even_when_the_forward_raises():
    model = tiny_peft_llama(dropout=0.1)
    model.train()
    model.base_model.model.model.layers[1].eval()  # a module the user keeps in eval on purpose
    flags = {name: m.training for name, m in model.named_modules()}
    _, adapters = adapters_of(model)
    scalings = [dict(m.scaling) for mods in adapters for m in mods]
    hook_counts = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = model.base_model.model.model.layers[3].mlp.register_forward_hook(boom)
    for mode in ("sequential", "batched"):
        with pytest.raises(RuntimeError, match="boom"):
            probe_losses(model, adapters, BETA, batch=((), lm_batch()), mode=mode)
    handle.remove()
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert [dict(m.scaling) for mods in adapters for m in mods] == scalings
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hook_counts


def test_probes_run_in_eval_mode_without_grad_and_are_deterministic():
    model = tiny_peft_llama(dropout=0.5)
    model.train()
    _, adapters = adapters_of(model)
    batch = ((), lm_batch())
    first = probe_losses(model, adapters, BETA, batch=batch)
    second = probe_losses(model, adapters, BETA, batch=batch)
    assert torch.equal(first, second)  # dropout off
    assert model.training
    model.eval()
    with suppress(adapters, BETA[0]):
        torch.testing.assert_close(hf_loss(model, lm_batch()), first[0])


# ---------------------------------------------------------------------------- the bandit learns
class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Net(nn.Module):
    """A user's own model: no HF, blocks in a plain ``nn.ModuleList`` named ``blocks``."""

    def __init__(self, width: int = 16, depth: int = 6):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def one_layer_matters(important: int, seed: int = 0):
    """Every adapter is zero but ``important``'s, whose output the targets were made with."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=4, target_modules=["fc"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 2.0 if f"blocks.{important}." in name else torch.zeros_like(p))
    x = torch.randn(32, 16)
    with torch.no_grad():
        y = model(x)
    return model, x, y


@pytest.mark.parametrize("rule", ["paper", "reference"])
@pytest.mark.parametrize("important", [1, 4])
def test_importance_moves_toward_the_layer_whose_suppression_hurts(rule, important):
    model, x, y = one_layer_matters(important)
    loss_fn = lambda output, x: nn.functional.mse_loss(output, y)  # noqa: E731
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    opt = IST(inner, model, probe_interval=1, importance_lr=100.0, rule=rule, loss_fn=loss_fn, seed=important)
    assert opt.layer_names[0].endswith("blocks.0") and len(opt.layer_names) == 6
    for _ in range(15):
        loss_fn(model(x), x).backward()
        opt.step()
        opt.zero_grad()
    importance = opt.scheduler.importance
    others = torch.cat([importance[:important], importance[important + 1 :]])
    assert opt.scheduler.num_updates == 15
    assert importance[important] > others.max() + 0.1, importance


def test_layers_with_and_without_adapters_mixed_raise_when_probes_are_on():
    """Layers with adapters and layers trained in full cannot be probed alike: say so at construction."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(Net(), LoraConfig(r=4, target_modules=["blocks.0.fc", "blocks.1.fc"]))
    for name, p in model.named_parameters():
        if ".blocks.5." in name:
            p.requires_grad_(True)  # block 5 trains in full
    with pytest.raises(ValueError, match="num_probes=0"):
        ISTAdamW(model, lr=1e-3)
    ISTAdamW(model, lr=1e-3, num_probes=0)
    ISTAdamW(Net(), lr=1e-3, loss_fn=lambda out, x: out.pow(2).mean())  # no adapters at all: full-layer mode


def test_merged_adapters_refuse_to_be_suppressed():
    model = tiny_peft_llama()
    _, adapters = adapters_of(model)
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="merged"):
        with suppress(adapters, BETA[0]):
            pass


class OwnLoRA(nn.Module):
    """A user's own adapter following the ``base_layer`` convention (no peft)."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        dtype = base.weight.dtype
        self.A = nn.Parameter(torch.randn(rank, base.in_features, dtype=dtype) * 0.3)
        self.B = nn.Parameter(torch.randn(base.out_features, rank, dtype=dtype) * 0.3)

    def forward(self, x):
        return self.base_layer(x) + x @ self.A.T @ self.B.T


def test_users_own_adapters_are_discovered_suppressed_and_trained():
    torch.manual_seed(0)
    model = Net().double()
    for block in model.blocks:
        block.fc = OwnLoRA(block.fc)
    model.head.requires_grad_(False)
    x = torch.randn(8, 16, dtype=torch.float64)
    layer_map, adapters = adapters_of(model)
    assert len(layer_map) == 6 and all(len(mods) == 1 for mods in adapters)
    beta = torch.tensor([1.0, 0.25, 0.0, 1.0, 0.5, 1.0], dtype=torch.float64)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for block, b in zip(reference.blocks, beta.tolist()):
            block.fc.B.mul_(b)  # the term is linear in B
        expected = reference(x)
        with suppress(adapters, beta):
            got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

    y = torch.randn(8, 1, dtype=torch.float64)
    loss_fn = lambda output, x: nn.functional.mse_loss(output, y)  # noqa: E731
    opt = ISTAdamW(model, lr=1e-2, active_layers=2, probe_interval=2, loss_fn=loss_fn)
    for _ in range(4):
        loss_fn(model(x), x).backward()
        opt.step()
        opt.zero_grad()
    assert opt.scheduler.num_updates == 2
