"""Triton kernels against their pure-torch references (interpreter on CPU, real kernels on CUDA)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lm_batch, tiny_peft_llama
from test_probes import tiny_peft_llama_lora_bias

pytest.importorskip("triton")

from ist_optim import ISTAdamW, discover_layers, find_adapter_modules, fuse_lora  # noqa: E402
from ist_optim.kernels import AUTO_TRITON_ON_CUDA, lora_expand_reference, lora_linear_reference, use_triton  # noqa: E402,E501
from ist_optim.kernels.ops import lora_expand_op  # noqa: E402
from ist_optim.kernels.triton_lora import lora_expand, lora_linear  # noqa: E402
from ist_optim.probes import probe_losses  # noqa: E402
from ist_optim.suppression import _fused_lora_probe, _scale_lora_scaling, _strategy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {  # accumulation is float32 in both; only the final rounding differs
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
# (M, N, r): prime M and N, one row, rank below 16 and not a power of two, rank above one tile
SHAPES = [(1, 17, 4), (37, 53, 5), (64, 96, 16), (29, 31, 33), (12, 40, 72)]


def rand(*shape, dtype=torch.float32, gen):
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def nan_padded(tensor: torch.Tensor, pad: int = 7) -> torch.Tensor:
    """A view of ``tensor`` inside a larger NaN buffer: a missing mask reads NaN."""
    rows, cols = tensor.shape
    buffer = torch.full((rows + 2 * pad, cols + 2 * pad), float("nan"), dtype=tensor.dtype, device=tensor.device)
    view = buffer[pad : pad + rows, pad : pad + cols]
    view.copy_(tensor)
    return view


def scales(groups: int) -> torch.Tensor:
    return torch.tensor([2.0, 0.5, 0.25, 1.0][:groups], device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_expand_matches_reference(dtype, shape):
    M, N, R = shape
    gen = torch.Generator().manual_seed(M * N + R)
    base, h, b = rand(M, N, dtype=dtype, gen=gen), rand(M, R, dtype=dtype, gen=gen), rand(N, R, dtype=dtype, gen=gen)
    groups = 1 if M % 2 else 2
    out = lora_expand(base, h, b, scales(groups))
    torch.testing.assert_close(out, lora_expand_reference(base, h, b, scales(groups)), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 17, 4, 9), (37, 53, 5, 70), (20, 31, 33, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_reference(dtype, shape, bias):
    M, N, R, K = shape
    gen = torch.Generator().manual_seed(M + N + R + K)
    x, w, h, b = (
        rand(M, K, dtype=dtype, gen=gen),
        rand(N, K, dtype=dtype, gen=gen),
        rand(M, R, dtype=dtype, gen=gen),
        rand(N, R, dtype=dtype, gen=gen),
    )
    bias_t = rand(N, dtype=dtype, gen=gen) if bias else None
    groups = 1 if M % 4 else 4
    out = lora_linear(x, w, bias_t, h, b, scales(groups))
    torch.testing.assert_close(out, lora_linear_reference(x, w, bias_t, h, b, scales(groups)), **TOLERANCE[dtype])


def test_nan_padded_and_non_contiguous_inputs_read_only_their_elements():
    M, N, R, K = 23, 19, 6, 13
    gen = torch.Generator().manual_seed(0)
    base, h, b = rand(M, N, gen=gen), rand(M, R, gen=gen), rand(N, R, gen=gen)
    x, w, bias = rand(M, K, gen=gen), rand(N, K, gen=gen), rand(N, gen=gen)
    expected = lora_expand_reference(base, h, b, scales(1))
    got = lora_expand(nan_padded(base), nan_padded(h), nan_padded(b), scales(1))
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])
    # transposed (column-major) views
    got = lora_expand(base.T.contiguous().T, h.T.contiguous().T, b.T.contiguous().T, scales(1))
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])
    got = lora_linear(nan_padded(x), nan_padded(w), bias, nan_padded(h), nan_padded(b), scales(1))
    assert not got.isnan().any()
    torch.testing.assert_close(got, lora_linear_reference(x, w, bias, h, b, scales(1)), **TOLERANCE[torch.float32])


def test_in_place_into_base():
    gen = torch.Generator().manual_seed(1)
    base, h, b = rand(16, 24, gen=gen), rand(16, 8, gen=gen), rand(24, 8, gen=gen)
    expected = lora_expand_reference(base, h, b, scales(2))
    out = lora_expand(base, h, b, scales(2), out=base)
    assert out is base
    torch.testing.assert_close(base, expected, **TOLERANCE[torch.float32])


def test_groups_change_only_the_scale_not_the_bits():
    """G=1 with scale s and G=2 with [s, s] differ only in launch arithmetic: results must be identical."""
    gen = torch.Generator().manual_seed(2)
    base, h, b = rand(18, 21, gen=gen), rand(18, 7, gen=gen), rand(21, 7, gen=gen)
    one = lora_expand(base, h, b, torch.tensor([0.5], device=DEVICE))
    two = lora_expand(base, h, b, torch.tensor([0.5, 0.5], device=DEVICE))
    assert torch.equal(one, two)
    per_group = lora_expand(base, h, b, torch.tensor([0.5, 0.25], device=DEVICE))
    assert torch.equal(per_group[:9], one[:9])
    assert not torch.equal(per_group[9:], one[9:])


def test_bad_shapes_raise():
    gen = torch.Generator().manual_seed(3)
    base, h, b = rand(6, 5, gen=gen), rand(6, 3, gen=gen), rand(5, 3, gen=gen)
    with pytest.raises(ValueError, match="groups"):
        lora_expand(base, h, b, scales(4))
    with pytest.raises(ValueError, match="shapes"):
        lora_expand(base, h, b.T, scales(1))
    with pytest.raises(ValueError, match="shapes"):
        lora_linear(base, rand(5, 4, gen=gen), None, h, b, scales(1))


@pytest.mark.parametrize("triton", [True, False])
def test_custom_op_autograd_matches_autograd_through_eager(triton):
    gen = torch.Generator().manual_seed(4)
    leaves = [rand(10, 12, gen=gen), rand(10, 6, gen=gen), rand(12, 6, gen=gen)]
    ours = [t.clone().requires_grad_() for t in leaves]
    eager = [t.clone().requires_grad_() for t in leaves]
    out = lora_expand_op(*ours, 0.5, triton)
    ref = eager[0] + (eager[1] @ eager[2].T) * 0.5
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])
    grad = rand(10, 12, gen=gen)
    out.backward(grad)
    ref.backward(grad)
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a.grad, b.grad, **TOLERANCE[torch.float32])


def test_custom_op_passes_opcheck():
    gen = torch.Generator().manual_seed(5)
    args = (
        rand(8, 5, gen=gen).requires_grad_(),
        rand(8, 3, gen=gen).requires_grad_(),
        rand(5, 3, gen=gen).requires_grad_(),
        0.5,
        True,
    )
    torch.library.opcheck(lora_expand_op, args)


def peft_llama(lora_bias: bool, num_layers: int = 4) -> torch.nn.Module:
    return (tiny_peft_llama_lora_bias if lora_bias else tiny_peft_llama)(num_layers).to(DEVICE)


@pytest.mark.parametrize("lora_bias", [False, True])
def test_fuse_lora_trains_like_peft(lora_bias):
    model = peft_llama(lora_bias)
    reference = copy.deepcopy(model)
    handle = fuse_lora(model, kernels="triton")
    # lora_bias: the kernel has no bias term, so those layers keep peft's forward
    assert len(handle.modules) == (0 if lora_bias else 20)
    batch = {k: v.to(DEVICE) for k, v in lm_batch().items()}
    loss, ref_loss = model(**batch).loss, reference(**batch).loss
    torch.testing.assert_close(loss, ref_loss, **TOLERANCE[torch.float32])
    loss.backward()
    ref_loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    ref_grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    assert any("lora_B" in name for name in ref_grads) and (not lora_bias or any(n.endswith("bias") for n in ref_grads))
    for name, ref_grad in ref_grads.items():  # every gradient the reference has, the fused op must give
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], ref_grad, **TOLERANCE[torch.float32])
    handle.remove()
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("lora_bias", [False, True])
@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_probes_with_triton_kernels_equal_the_torch_path(mode, lora_bias):
    model = peft_llama(lora_bias, num_layers=2)
    layer_map = discover_layers(model, [p for p in model.parameters() if p.requires_grad])
    adapters = find_adapter_modules(model, layer_map.params)
    # lora_bias layers take the exact scaling path even when Triton is forced
    expected = _scale_lora_scaling if lora_bias else _fused_lora_probe
    assert all(_strategy(m, "triton") is expected for mods in adapters for m in mods)
    beta = torch.tensor([[1.0, 0.25], [0.25, 1.0]], dtype=torch.float64)
    batch = ((), {k: v.to(DEVICE) for k, v in lm_batch().items()})
    torch_losses = probe_losses(model, adapters, beta, batch=batch, mode=mode, kernels="torch")
    triton_losses = probe_losses(model, adapters, beta, batch=batch, mode=mode, kernels="triton")
    torch.testing.assert_close(triton_losses, torch_losses, rtol=1e-5, atol=1e-6)
    assert all("forward" not in vars(m) for m in model.modules())  # restored


def patch_by_user(module: torch.nn.Module, calls: list) -> object:
    """A user's (or accelerate's) forward on the instance, calling the forward it replaced."""
    inner = module.forward

    def forward(x, *args, **kwargs):
        calls.append(module)
        return inner(x, *args, **kwargs)

    module.forward = forward
    return forward


def test_fuse_lora_keeps_a_forward_patched_on_the_instance_before_or_after_it():
    model = peft_llama(False, num_layers=2)
    reference = copy.deepcopy(model)
    q_proj, v_proj = (getattr(model.base_model.model.model.layers[0].self_attn, n) for n in ("q_proj", "v_proj"))
    calls: list = []
    users = patch_by_user(q_proj, calls)
    with pytest.warns(UserWarning, match="1 LoRA layers already have a forward"):
        handle = fuse_lora(model, kernels="triton")
    assert q_proj not in handle.modules and len(handle.modules) == 9  # fusing would bypass the user's forward
    later = patch_by_user(v_proj, calls)  # patched on top of fuse_lora's forward
    batch = {k: v.to(DEVICE) for k, v in lm_batch().items()}
    with torch.no_grad():
        expected = reference(**batch).loss
        torch.testing.assert_close(model(**batch).loss, expected, **TOLERANCE[torch.float32])
        assert calls == [q_proj, v_proj]
        handle.remove()
        assert vars(q_proj)["forward"] is users and vars(v_proj)["forward"] is later  # nothing of theirs removed
        torch.testing.assert_close(model(**batch).loss, expected, **TOLERANCE[torch.float32])
    assert calls == [q_proj, v_proj] * 2
    assert sum("forward" in vars(m) for m in model.modules()) == 2


def two_layer_probe_setup():
    """A 2-layer peft LLaMA, its adapters, two candidates' betas and a batch for ``probe_losses``."""
    model = peft_llama(False, num_layers=2)
    layer_map = discover_layers(model, [p for p in model.parameters() if p.requires_grad])
    adapters = find_adapter_modules(model, layer_map.params)
    beta = torch.tensor([[1.0, 0.25], [0.25, 1.0]], dtype=torch.float64)
    batch = ((), {k: v.to(DEVICE) for k, v in lm_batch().items()})
    return model, adapters, beta, batch


@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_triton_probes_keep_a_forward_patched_on_the_instance(mode):
    model, adapters, beta, batch = two_layer_probe_setup()
    torch_losses = probe_losses(model, adapters, beta, batch=batch, mode=mode, kernels="torch")
    calls: list = []
    patched = {module: patch_by_user(module, calls) for module in (adapters[0][0], adapters[1][3])}
    # swapping their forward would bypass the user's: exact scaling path instead
    assert all(_strategy(m, "triton") is _scale_lora_scaling for m in patched)
    triton_losses = probe_losses(model, adapters, beta, batch=batch, mode=mode, kernels="triton")
    torch.testing.assert_close(triton_losses, torch_losses, rtol=1e-5, atol=1e-6)
    assert len(calls) == (4 if mode == "sequential" else 2)  # every candidate's forward went through them
    assert {m: vars(m).get("forward") for mods in adapters for m in mods} == {
        m: patched.get(m) for mods in adapters for m in mods
    }


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_probes_on_a_fused_model_equal_the_unfused_model(mode, kernels):
    """fuse_lora's forward stays in place and reads the scaled ``scaling`` (per-row tensors go to peft's forward)."""
    model, adapters, beta, batch = two_layer_probe_setup()
    expected = probe_losses(model, adapters, beta, batch=batch, mode=mode, kernels="torch")
    handle = fuse_lora(model, kernels=kernels)
    fused = {m: vars(m)["forward"] for m in handle.modules}
    losses = probe_losses(model, adapters, beta, batch=batch, mode=mode, kernels=kernels)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)
    assert {m: vars(m)["forward"] for m in handle.modules} == fused
    handle.remove()


def test_auto_never_picks_triton_until_a_gpu_has_checked_it_and_the_option_is_validated():
    weight = torch.zeros(2, 2)
    assert not use_triton(weight)  # CPU: auto never picks the interpreter
    assert not AUTO_TRITON_ON_CUDA  # CUDA too, until bench/gpu_check.py has passed on a GPU (issue 20)
    if not torch.cuda.is_available():
        assert use_triton(weight, forced=True)  # conftest turned the interpreter on
    with pytest.raises(ValueError, match="kernels"):
        ISTAdamW(tiny_peft_llama(), lr=1e-3, kernels="cuda")
