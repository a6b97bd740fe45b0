"""Selection policies: each one's statistics match its definition; checkpoints resume; bad input is refused."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import lm_batch, tiny_peft_llama

from ist_optim import FixedLayers, ISTAdamW, LayerPolicy, WeightedLayers


def counts(opt, steps: int) -> torch.Tensor:
    """How often each layer was selected over ``steps`` selections (no training needed: selection only)."""
    total = torch.zeros(len(opt.layer_names))
    for _ in range(steps):
        for layer in opt.scheduler.sample_active():
            total[layer] += 1
    return total


def test_random_is_uniform_within_sampling_error():
    opt = ISTAdamW(tiny_peft_llama(num_layers=4), lr=1e-2, policy="random", active_layers=1, seed=1)
    assert not opt.probes_enabled
    frequency = counts(opt, 4000) / 4000
    # binomial standard error at p = 0.25, n = 4000: 0.0068; allow 4 of them
    assert torch.allclose(frequency, torch.full((4,), 0.25), atol=0.028), frequency


def test_weighted_follows_its_weights():
    weights = [6.0, 2.0, 1.0, 1.0]
    opt = ISTAdamW(tiny_peft_llama(num_layers=4), lr=1e-2, policy=WeightedLayers(weights, active_layers=1, seed=3))
    frequency = counts(opt, 4000) / 4000
    expected = torch.tensor(weights) / sum(weights)
    assert torch.allclose(frequency, expected, atol=0.03), frequency


def test_fixed_never_changes_and_trains_only_its_layers():
    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, lr=1e-2, policy=FixedLayers([1, 3]))
    for step in range(4):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        assert opt.active_layers == [1, 3]
        moved = {
            int(n.split(".layers.")[1].split(".")[0])
            for n, p in model.named_parameters()
            if n in before and not torch.equal(p, before[n])
        }
        assert moved == {1, 3}


class RoundRobin(LayerPolicy):
    """A user's own policy: one layer after the other."""

    def sample_active(self) -> list[int]:
        self.active = [(self.active[0] + 1) % self.num_layers] if self.active else [0]
        return list(self.active)


@pytest.mark.parametrize(
    "make", [lambda: RoundRobin(), lambda: WeightedLayers([1.0, 2.0, 3.0, 4.0], 2, seed=5), lambda: "random"]
)
def test_a_policy_resumes_bit_for_bit(make):
    def run(opt, model, steps, seed=0):
        selections = []
        for step in range(steps):
            model(**lm_batch(seed=seed + step)).loss.backward()
            opt.step()
            opt.zero_grad()
            selections.append(opt.active_layers)
        return selections

    model = tiny_peft_llama(num_layers=4)
    opt = ISTAdamW(model, lr=1e-2, policy=make())
    run(opt, model, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    selections = run(opt, model, 4, seed=3)
    assert len({tuple(s) for s in selections}) > 1

    resumed_model = tiny_peft_llama(num_layers=4)
    resumed = ISTAdamW(resumed_model, lr=1e-2, policy=make())
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert run(resumed, resumed_model, 4, seed=3) == selections


def test_a_checkpoint_of_another_policy_is_refused():
    saved = ISTAdamW(tiny_peft_llama(num_layers=4), lr=1e-2).state_dict()
    opt = ISTAdamW(tiny_peft_llama(num_layers=4), lr=1e-2, policy=FixedLayers([0]))
    with pytest.raises(ValueError, match="policy"):
        opt.load_state_dict(saved)
    assert opt.active_layers == [0]


@pytest.mark.parametrize(
    "policy, error, match",
    [
        ("lomo", ValueError, "policy"),
        (FixedLayers([0, 4]), ValueError, "4 layers"),
        (WeightedLayers([1.0, 1.0]), ValueError, "2 of them"),
        (WeightedLayers([1.0, 0.0, 0.0, 0.0], active_layers=2), ValueError, "positive"),
    ],
)
def test_bad_policies_are_refused_at_construction(policy, error, match):
    with pytest.raises(error, match=match):
        ISTAdamW(tiny_peft_llama(num_layers=4), lr=1e-2, policy=policy)


def test_bad_policy_arguments_are_refused():
    with pytest.raises(ValueError, match="repeated"):
        FixedLayers([1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        WeightedLayers([1.0, -1.0])


class ProbingRoundRobin(RoundRobin):
    """A user's policy that learns from probe passes: it records what IST gives it."""

    uses_probes = True

    def __init__(self):
        super().__init__()
        self.updates = []

    def sample_candidates(self) -> torch.Tensor:
        kept = torch.zeros(2, self.num_layers, dtype=torch.bool)
        kept[0, ::2] = kept[1, 1::2] = True
        return kept

    def update(self, kept: torch.Tensor, losses: torch.Tensor) -> bool:
        self.updates.append(losses.clone())
        return True


def test_a_user_policy_with_probes_gets_probe_losses():
    model = tiny_peft_llama(num_layers=4)
    policy = ProbingRoundRobin()
    opt = ISTAdamW(model, lr=1e-2, policy=policy, probe_interval=2)
    assert opt.probes_enabled
    for step in range(4):
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert len(policy.updates) == 2 and all(u.shape == (2,) and u[0] != u[1] for u in policy.updates)


@pytest.mark.parametrize("policy", ["ist", "random", "lisa", "spread", "safe", "cka", "gradnorm"])
@pytest.mark.parametrize(
    "bad",
    [
        dict(active_layers=True),
        dict(active_layers="0.5"),
        dict(active_layers=torch.tensor(0.5)),
        dict(importance_lr="x"),
        dict(importance_lr=None),
        dict(probe_layers=True),
        dict(rule="papper"),
        dict(reward="diff"),
        dict(probe_mode="parallel"),
        dict(probe_rows=0),
        dict(state_policy="evict"),
        dict(backward_cut="yes"),
        dict(check_consistency=1),
        dict(seed="1"),
    ],
)
def test_bad_option_types_are_refused_for_every_named_policy(policy, bad):
    with pytest.raises((TypeError, ValueError), match=next(iter(bad))):
        ISTAdamW(tiny_peft_llama(), lr=1e-2, policy=policy, **bad)


def test_a_policy_refusing_the_model_in_attach_leaves_no_hooks_behind():
    from ist_optim import LayerwiseCKA

    model = tiny_peft_llama()
    with pytest.raises(TypeError, match="calibration batch"):
        ISTAdamW(model, lr=1e-2, policy=LayerwiseCKA([3]))  # 3 is no batch: refused in attach
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())  # the watched class given back
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    opt = ISTAdamW(model, lr=1e-2)  # and a new IST builds without meeting the old hooks
    assert opt.hooks.user_frozen == []


def test_options_hold_every_keyword_option_of_ist_once_normalised():
    """``IST.options`` names each keyword option of ``IST.__init__`` (less the callables and layer lists it
    cannot checkpoint), and what a checkpoint carries is a part of it."""
    import inspect

    from ist_optim.optimizer import _CHECKPOINTED_OPTIONS, IST

    parameters = inspect.signature(IST.__init__).parameters.values()
    keywords = {p.name for p in parameters if p.kind is p.KEYWORD_ONLY} - {"loss_fn", "layers", "layer_of"}
    opt = ISTAdamW(tiny_peft_llama(), lr=1e-2, active_layers=np.int64(2), suppression=np.float32(0.5))
    assert set(opt.options) == keywords
    assert set(_CHECKPOINTED_OPTIONS) <= set(opt.options)
    assert type(opt.options["active_layers"]) is int and type(opt.options["suppression"]) is float
    assert set(opt.state_dict()["ist"]["options"]) == set(_CHECKPOINTED_OPTIONS)


def test_spread_draws_one_layer_per_depth_stratum_with_random_s_marginals():
    """``SpreadLayers``: the layers ``floor((u + j) L / k)`` for one uniform ``u`` a step, by hand; every layer's
    frequency ``k / L``; the layers of a draw ``L / k`` apart (rounded down or up)."""
    import math

    from ist_optim import SpreadLayers

    L, k, n = 10, 3, 12000
    policy = SpreadLayers(k, seed=4)
    policy.bind(L)
    twin = torch.Generator().manual_seed(4)
    counts = torch.zeros(L, dtype=torch.float64)
    pairs = set()
    for _ in range(n):
        active = policy.sample_active()
        u = float(torch.rand((), generator=twin, dtype=torch.float64))
        assert active == [math.floor((u + j) * L / k) for j in range(k)]
        gaps = {b - a for a, b in zip(active, active[1:] + [active[0] + L])}  # around the depth, as a circle
        assert gaps <= {math.floor(L / k), math.ceil(L / k)}  # evenly spread: L / k apart, rounded
        counts[active] += 1
        pairs.update((a, b) for a in active for b in active if a < b)
    p = k / L
    assert bool(((counts / n - p).abs() <= 4 * math.sqrt(p * (1 - p) / n)).all()), counts / n
    assert (0, 1) not in pairs and (0, 2) not in pairs  # neighbours never together at L / k > 3
    opt = ISTAdamW(tiny_peft_llama(), lr=1e-2, policy="spread", active_layers=1)
    assert type(opt.scheduler) is SpreadLayers and not opt.probes_enabled
