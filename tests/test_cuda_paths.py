"""What the CUDA paths must hold that a CPU run cannot show by itself (issue 20), made visible here.

* the in-place expand stays exact when the launch is tuned on its real arguments (a stand-in
  benchmark launches every config several times, as Triton's autotuner does on a GPU);
* one dtype goes into each ``tl.dot`` (fp32 adapters under bf16 autocast), with IEEE fp32 for an
  fp32 adapter product on a bf16 base; the interpreter's bf16 upcast hides both, so the launch
  arguments are checked, not only the results;
* no host tensor is built or copied per LoRA module in a forward (fused, and batched probes);
* offload waits for its copies on every device before host state is read.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lm_batch, tiny_peft_llama
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ist_optim import ISTAdamW, find_adapter_modules, fuse_lora
from ist_optim.kernels import lora_expand_reference, lora_linear_reference
from ist_optim.probes import probe_losses

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- tuning an in-place launch
@pytest.fixture
def tuned_like_a_gpu(monkeypatch):
    """Every autotuned kernel in triton_lora gets three configs and a benchmark that launches each 3 times."""
    pytest.importorskip("triton")
    from triton import Config
    from triton.runtime.autotuner import Autotuner

    from ist_optim.kernels import triton_lora

    def bench(kernel_call, quantiles=None):
        for _ in range(3):
            kernel_call()
        return [1.0, 1.0, 1.0]

    tuners = [obj for obj in vars(triton_lora).values() if isinstance(obj, Autotuner)]
    for tuner in tuners:
        keys = set(tuner.configs[0].kwargs)
        configs = [
            {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32},
            {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16},
            {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16},
        ]
        monkeypatch.setattr(tuner, "configs", [Config({k: v for k, v in c.items() if k in keys}) for c in configs])
        monkeypatch.setattr(tuner, "_do_bench", bench)
        monkeypatch.setattr(tuner, "cache", {})
    return tuners


@pytest.mark.parametrize("rows", [24, 40])  # a second sequence length after the first was tuned
def test_in_place_expand_is_exact_when_the_launch_is_tuned_on_its_real_arguments(tuned_like_a_gpu, rows):
    from ist_optim.kernels.triton_lora import lora_expand

    base, h, b = _rand(rows, 48, seed=1), _rand(rows, 8, seed=2), _rand(48, 8, seed=3)
    scale = torch.tensor([0.5, 2.0])
    expected = lora_expand_reference(base, h, b, scale, alpha=1.5)
    for _ in range(2):  # first call (tuning, if any) and a cached one
        fresh = base.clone()
        out = lora_expand(fresh, h, b, scale, alpha=1.5, out=fresh)
        assert out is fresh
        torch.testing.assert_close(fresh, expected, **TOL[torch.float32])


def test_linear_is_exact_when_the_launch_is_tuned_on_its_real_arguments(tuned_like_a_gpu):
    from ist_optim.kernels.triton_lora import lora_linear

    x, w, bias = _rand(24, 20, seed=1), _rand(36, 20, seed=2), _rand(36, seed=3)
    h, b = _rand(24, 6, seed=4), _rand(36, 6, seed=5)
    expected = lora_linear_reference(x, w, bias, h, b, torch.tensor([0.5, 0.25]), alpha=2.0)
    for _ in range(2):
        got = lora_linear(x, w, bias, h, b, torch.tensor([0.5, 0.25]), alpha=2.0)
        torch.testing.assert_close(got, expected, **TOL[torch.float32])


# ---------------------------------------------------------------- one dtype into tl.dot
class _LaunchSpy:
    """Stands in for a jitted kernel: records each launch's arguments by name, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []
        self.arg_names = getattr(kernel, "arg_names", None) or kernel.fn.arg_names

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({**dict(zip(self.arg_names, args)), **kwargs})
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def spies(monkeypatch):
    pytest.importorskip("triton")
    from ist_optim.kernels import triton_lora

    found = {}
    for name in ("_lora_expand_kernel", "_lora_linear_kernel"):
        found[name] = _LaunchSpy(getattr(triton_lora, name))
        monkeypatch.setattr(triton_lora, name, found[name])
    return found


def _check_dots(launch, pairs):
    for a, b, ieee in pairs:
        assert launch[a].dtype == launch[b].dtype, f"tl.dot of {launch[a].dtype} and {launch[b].dtype}"
        if launch[a].dtype == torch.float32:
            assert launch[ieee], "an fp32 product must run in IEEE fp32, not TF32"


@pytest.mark.parametrize(
    "base_dtype, h_dtype, b_dtype",
    [
        (torch.bfloat16, torch.bfloat16, torch.float32),  # fp32 adapters under bf16 autocast
        (torch.bfloat16, torch.float32, torch.float32),  # bf16 base, fp32 adapters, no autocast
        (torch.float32, torch.bfloat16, torch.float32),
    ],
)
def test_mixed_dtypes_give_one_dtype_to_each_dot_and_the_reference_result(spies, base_dtype, h_dtype, b_dtype):
    from ist_optim.kernels.triton_lora import lora_expand, lora_linear

    base, h, b = _rand(20, 24, dtype=base_dtype, seed=1), _rand(20, 4, dtype=h_dtype, seed=2), _rand(24, 4, seed=3)
    b = b.to(b_dtype)
    out = lora_expand(base, h, b, alpha=2.0)
    torch.testing.assert_close(out, lora_expand_reference(base, h, b, alpha=2.0), **TOL[base_dtype])
    _check_dots(spies["_lora_expand_kernel"].launches[-1], [("h_ptr", "b_ptr", "IEEE")])

    x, w = _rand(20, 12, dtype=base_dtype, seed=4), _rand(24, 12, dtype=base_dtype, seed=5)
    got = lora_linear(x, w, None, h, b, alpha=2.0)
    torch.testing.assert_close(got, lora_linear_reference(x, w, None, h, b, alpha=2.0), **TOL[base_dtype])
    _check_dots(
        spies["_lora_linear_kernel"].launches[-1], [("x_ptr", "w_ptr", "IEEE_BASE"), ("h_ptr", "b_ptr", "IEEE")]
    )


def test_fuse_lora_under_bf16_autocast_with_fp32_adapters_matches_peft(spies):
    model = tiny_peft_llama(2)
    reference = copy.deepcopy(model)
    handle = fuse_lora(model, kernels="triton")
    batch = lm_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, ref_loss = model(**batch).loss, reference(**batch).loss
    assert spies["_lora_expand_kernel"].launches, "the fused forward did not launch the kernel"
    for launch in spies["_lora_expand_kernel"].launches:
        _check_dots(launch, [("h_ptr", "b_ptr", "IEEE")])
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=2e-2, atol=2e-2)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    handle.remove()


def test_kernel_inputs_on_two_devices_are_refused():
    pytest.importorskip("triton")
    from ist_optim.kernels.triton_lora import lora_expand

    base, h, b = _rand(4, 6), _rand(4, 2), _rand(6, 2)
    with pytest.raises(ValueError, match="one device"):
        lora_expand(base, h.to("meta"), b)
    with pytest.raises(ValueError, match="build it on their device"):
        lora_expand(base, h, b, torch.ones(1, device="meta"))


# ---------------------------------------------------------------- host copies in a forward
HOST_OPS = {"_to_copy", "lift_fresh", "lift_fresh_copy", "scalar_tensor", "_local_scalar_dense", "tensor"}


class _CountHostOps(TorchDispatchMode):
    """Counts tensor constructions from Python data, dtype/device copies and ``.item()`` syncs."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in HOST_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _lora_stack(num_layers: int) -> nn.Module:
    """``num_layers`` peft LoRA Linears and nothing else: every op in its forward is the adapters'."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(num_layers)])
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[str(i) for i in range(num_layers)]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_fused_forward_builds_no_host_tensor_per_module(kernels):
    if kernels == "triton":
        pytest.importorskip("triton")
    model = _lora_stack(6)
    fuse_lora(model, kernels=kernels)
    x = _rand(8, 16)
    with torch.no_grad(), _CountHostOps() as counter:
        model(x)
    assert counter.count == 0


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_batched_probes_copy_betas_once_per_pass_not_per_module(kernels):
    if kernels == "triton":
        pytest.importorskip("triton")
    counts = []
    for num_layers in (2, 6):
        model = _lora_stack(num_layers)
        params = [[p for n, p in model.named_parameters() if f".{i}." in n and "lora" in n] for i in range(num_layers)]
        adapters = find_adapter_modules(model, params)
        beta = torch.full((2, num_layers), 0.25, dtype=torch.float64)
        beta[0, 0] = beta[1, 1] = 1.0

        def loss_fn(out, *args, **kwargs):
            return out.pow(2).mean()

        batch = ((_rand(4, 16),), {})
        probe_losses(model, adapters, beta, batch=batch, mode="batched", kernels=kernels, loss_fn=loss_fn)
        with _CountHostOps() as counter:
            probe_losses(model, adapters, beta, batch=batch, mode="batched", kernels=kernels, loss_fn=loss_fn)
        counts.append(counter.count)
    assert counts[0] == counts[1], f"host ops grow with the number of adapter modules: {counts}"


# ---------------------------------------------------------------- offload: wait before host reads
def test_deepcopy_and_state_dict_wait_for_offload_copies(monkeypatch):
    model = tiny_peft_llama(4)
    opt = ISTAdamW(model, lr=1e-3, num_probes=0, state_policy="offload", active_layers=1)
    model(**lm_batch()).loss.backward()
    opt.step()
    calls = []
    monkeypatch.setattr(opt.evictor, "synchronize", lambda: calls.append(1))
    copy.deepcopy(opt)
    assert calls, "deepcopy read host state without waiting for the copies"
    calls.clear()
    opt.state_dict()
    assert calls


def test_synchronize_waits_on_every_device_that_holds_offloaded_state(monkeypatch):
    from ist_optim import eviction

    waited = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    evictor = eviction.StateEvictor(torch.optim.SGD([nn.Parameter(torch.zeros(1))]), [[]], "offload")
    evictor.evicted.add(0)
    evictor.copy_devices.update({torch.device("cuda", 0), torch.device("cuda", 1)})
    evictor.synchronize()
    assert sorted(str(d) for d in waited) == ["cuda:0", "cuda:1"]
