"""SafeImportance: its inclusion probabilities against the formula, their floor, forced coverage, the signal.

The rule is checked against a hand computation of ``pi = k ((1 - gamma) q + gamma / L)``
(capped at 1), the draws' marginals against ``pi``, the floor and the coverage
bound under a planted, extreme signal, and the potentials against the moving
average of ``||grad lora_B||^2`` read off the gradients by hand.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from conftest import lm_batch, tiny_peft_llama

from ist_optim import ISTAdamW, SafeImportance
from ist_optim.policies import systematic_sample


def seen_policy(potentials, k, **options):
    policy = SafeImportance(k, seed=0, **options)
    policy.bind(len(potentials))
    policy.moments = torch.tensor(potentials, dtype=torch.float64) * (1 - policy.decay)  # one update each
    policy.updates = torch.ones(len(potentials), dtype=torch.long)
    return policy


def test_inclusion_is_the_mixture_formula():
    G = [1.0, 2.0, 0.5, 4.0, 1.5, 1.0]
    policy = seen_policy(G, 2, gamma=0.4, eta=0.7, min_gain=0.0)
    torch.testing.assert_close(policy.potentials, torch.tensor(G, dtype=torch.float64))
    g = torch.tensor(G, dtype=torch.float64)
    q = torch.exp(torch.clamp(0.7 * g / g.mean(), max=5.0))
    expected = 2 * (0.6 * q / q.sum() + 0.4 / 6)
    assert bool((expected < 1).all())  # no cap in this case
    torch.testing.assert_close(policy.inclusion(), expected, rtol=1e-12, atol=1e-12)
    assert math.isclose(float(policy.inclusion().sum()), 2.0)


def test_draws_have_the_inclusion_probabilities_as_marginals():
    policy = seen_policy([1.0, 3.0, 0.2, 2.0, 0.5, 1.0, 6.0, 0.1], 3, gamma=0.3, min_gain=0.0)
    pi = policy.inclusion()
    counts = torch.zeros(8, dtype=torch.float64)
    n = 20000
    generator = torch.Generator().manual_seed(1)
    for _ in range(n):
        chosen = systematic_sample(pi, generator)
        assert len(chosen) == 3
        counts[chosen] += 1
    sd = (pi * (1 - pi) / n).sqrt()
    assert bool(((counts / n - pi).abs() <= 4 * sd + 1e-12).all()), (counts / n, pi)


def test_equal_inclusion_draws_every_subset_alike():
    """With equal ``pi`` the draw is uniform without replacement: every pair of 6 layers, neighbours included (a
    fixed-order systematic draw only ever gives the 3 evenly spaced pairs)."""
    pi = torch.full((6,), 2 / 6, dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    n = 15000
    pairs = Counter(tuple(systematic_sample(pi, generator)) for _ in range(n))
    assert len(pairs) == 15 and all(len(pair) == 2 for pair in pairs)
    p = 1 / 15
    assert all(abs(c / n - p) <= 4 * math.sqrt(p * (1 - p) / n) for c in pairs.values()), pairs


def test_the_floor_holds_under_an_extreme_signal():
    policy = seen_policy([1e6, 1e-6, 1e-6, 1e-6, 1e-6, 1e-6], 2, gamma=0.25)
    pi = policy.inclusion()
    assert bool((pi >= 0.25 * 2 / 6 - 1e-12).all()) and float(pi[0]) == 1.0  # capped, the excess moved on
    assert math.isclose(float(pi.sum()), 2.0)


def test_equal_signals_draw_uniformly():
    policy = seen_policy([2.0] * 5, 2, gamma=0.1, min_gain=0.05)
    torch.testing.assert_close(policy.inclusion(), torch.full((5,), 0.4, dtype=torch.float64))


def test_first_pass_covers_every_layer_and_no_layer_waits_past_coverage():
    L, k = 8, 2
    policy = SafeImportance(k, gamma=0.01, eta=5.0, seed=3)
    policy.bind(L)
    last = [-1] * L
    for step in range(300):
        active = policy.sample_active()
        assert len(active) == k
        for layer in active:
            assert step - last[layer] <= policy.coverage, (step, layer, last)
            last[layer] = step
        if step == math.ceil(L / k) - 1:
            assert min(last) >= 0  # every layer trained in the first ceil(L/k) steps
        norms = torch.full((L,), 1e-3, dtype=torch.float64)
        norms[5] = 10.0  # one layer's gradient dwarfs the others'
        policy.observe_gradients(norms)
        policy.after_step(None)
    assert policy.coverage == 2 * math.ceil(L / k)
    assert int(policy.updates[5]) > 300 * k / L  # the signal is followed...
    assert int(policy.updates.min()) >= 300 // policy.coverage  # ...and nothing starves


def test_potentials_are_the_moving_average_of_the_b_gradients_by_hand():
    model = tiny_peft_llama()
    policy = SafeImportance(2, decay=0.5, seed=0)
    opt = ISTAdamW(model, lr=1e-2, policy=policy)
    layer_of = {id(p): i for i, ps in enumerate(opt.layer_map.params) for p in ps}
    b_params = [(layer_of[id(p)], p) for n, p in model.named_parameters() if "lora_B" in n]
    moments, updates = torch.zeros(4, dtype=torch.float64), [0] * 4
    for step in range(6):
        active = opt.active_layers
        model(**lm_batch(seed=step)).loss.backward()
        squares = torch.zeros(4, dtype=torch.float64)
        for layer, p in b_params:
            if p.grad is not None:
                squares[layer] += torch.linalg.vector_norm(p.grad, dtype=torch.float64) ** 2
        for layer in active:
            moments[layer] = 0.5 * moments[layer] + 0.5 * squares[layer]
            updates[layer] += 1
        opt.step()
        opt.zero_grad()
    n = torch.tensor(updates, dtype=torch.float64)
    expected = torch.where(n > 0, moments / (1 - 0.5**n), torch.full_like(n, math.nan))
    torch.testing.assert_close(policy.potentials, expected, rtol=1e-9, atol=0, equal_nan=True)
    assert policy.updates.tolist() == updates


@pytest.mark.parametrize("coverage", [4, 5, 7])
def test_the_coverage_bound_holds_at_its_tightest_settings(coverage):
    """coverage = ceil(L/k) is round-robin; just above it, with two layers taking every sampled slot, the others
    are trained only when forced, and must all fit in the k slots."""
    L, k = 8, 2
    policy = SafeImportance(k, gamma=0.01, eta=5.0, coverage=coverage, seed=1)
    policy.bind(L)
    last = [-1] * L
    norms = torch.tensor([10.0, 5.0] + [1e-3] * (L - 2), dtype=torch.float64)
    for step in range(200):
        for layer in policy.sample_active():
            assert step - last[layer] <= coverage, (step, layer, last)
            last[layer] = step
        policy.observe_gradients(norms)
        policy.after_step(None)
    assert all(200 - 1 - t <= coverage for t in last)


def test_safe_by_name_and_bad_settings():
    opt = ISTAdamW(tiny_peft_llama(), lr=1e-2, policy="safe", active_layers=2)
    assert isinstance(opt.scheduler, SafeImportance) and opt.scheduler.num_active == 2
    for bad in (
        dict(gamma=0.0),
        dict(gamma=1.5),
        dict(decay=1.0),
        dict(eta=-1.0),
        dict(min_gain=2.0),
        dict(coverage=0),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SafeImportance(2, **bad)
    with pytest.raises(ValueError, match="coverage"):
        ISTAdamW(tiny_peft_llama(), lr=1e-2, policy=SafeImportance(1, coverage=3))  # 4 layers, 1 per step
