"""ImportanceScheduler: samplers and update rules against DESIGN.md section 1, by hand."""

from __future__ import annotations

import io
import math

import pytest
import torch

from ist_optim import ImportanceScheduler
from ist_optim.scheduler import resolve_layer_count


def test_layer_counts_resolve_fractions_and_ints():
    assert resolve_layer_count(0.25, 12, "x") == 3
    assert resolve_layer_count(0.25, 30, "x") == 8  # 7.5 rounds up
    assert resolve_layer_count(0.01, 12, "x") == 1  # never zero
    assert resolve_layer_count(1.0, 12, "x") == 12
    assert resolve_layer_count(1, 12, "x") == 1  # an int is a count
    assert resolve_layer_count(12, 12, "x") == 12


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(active_layers=0), ValueError, "active_layers"),
        (dict(active_layers=13), ValueError, "active_layers"),
        (dict(active_layers=1.5), ValueError, "active_layers"),
        (dict(active_layers=0.0), ValueError, "active_layers"),
        (dict(active_layers=True), TypeError, "active_layers"),
        (dict(active_layers="all"), TypeError, "active_layers"),
        (dict(probe_layers=-0.5), ValueError, "probe_layers"),
        (dict(probe_layers=20), ValueError, "probe_layers"),
        (dict(probe_layers=1.0), ValueError, "probe_layers"),
        (dict(num_probes=-1), ValueError, "num_probes"),
        (dict(num_probes=1), ValueError, "num_probes"),
        (dict(importance_lr=-1.0), ValueError, "importance_lr"),
        (dict(importance_lr=float("nan")), ValueError, "importance_lr"),
        (dict(rule="ucb"), ValueError, "rule"),
    ],
)
def test_bad_options_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        ImportanceScheduler(12, **kwargs)


def test_too_many_probes_for_distinct_sets_raises():
    with pytest.raises(ValueError, match="distinct"):
        ImportanceScheduler(3, probe_layers=1, num_probes=4)
    ImportanceScheduler(3, probe_layers=1, num_probes=3)  # exactly enough


def test_paper_sampler_is_top_k_of_uniform_times_sigmoid():
    sched = ImportanceScheduler(6, active_layers=2, rule="paper", seed=3)
    sched.importance = torch.tensor([0.0, 2.0, -1.0, 0.5, 3.0, -2.0])
    g = torch.Generator().manual_seed(3)
    p = torch.rand(6, generator=g) * torch.sigmoid(sched.importance)
    expected = sorted(torch.topk(p, 2).indices.tolist())
    assert sched.sample_active() == expected
    assert sched.active == expected


def test_reference_sampler_is_multinomial_of_sigmoid_importance():
    sched = ImportanceScheduler(6, active_layers=3, rule="reference", seed=5)
    sched.importance = torch.tensor([0.0, 2.0, -1.0, 0.5, 3.0, -2.0])
    g = torch.Generator().manual_seed(5)
    # the released code trains multinomial(sigmoid(-s)) with s = -importance
    expected = sorted(torch.multinomial(torch.sigmoid(sched.importance), 3, replacement=False, generator=g).tolist())
    assert sched.sample_active() == expected


def test_reference_candidates_suppress_multinomial_of_sigmoid_minus_importance():
    sched = ImportanceScheduler(6, probe_layers=3, num_probes=2, rule="reference", seed=7)
    sched.importance = torch.tensor([0.0, 2.0, -1.0, 0.5, 3.0, -2.0])
    g = torch.Generator().manual_seed(7)
    kept = sched.sample_candidates()
    assert kept.shape == (2, 6) and kept.dtype == torch.bool
    for row in kept:
        suppressed = torch.multinomial(torch.sigmoid(-sched.importance), 3, replacement=False, generator=g)
        expected = torch.ones(6, dtype=torch.bool)
        expected[suppressed] = False
        assert torch.equal(row, expected)


def test_paper_candidates_keep_n_v_layers_and_are_distinct():
    sched = ImportanceScheduler(4, probe_layers=2, num_probes=6, rule="paper", seed=0)
    kept = sched.sample_candidates()
    assert kept.shape == (6, 4)
    assert (kept.sum(1) == 2).all()
    assert len({tuple(r.tolist()) for r in kept}) == 6  # all C(4, 2) sets, none repeated


def test_rewards_are_exp_minus_loss_centered():
    losses = torch.tensor([1.0, 2.0, 0.5])
    e = [math.exp(-x) for x in losses.tolist()]
    expected = torch.tensor([v - sum(e) / 3 for v in e])
    torch.testing.assert_close(ImportanceScheduler.rewards(losses), expected)


def test_paper_update_adds_mu_times_reward_to_kept_layers():
    sched = ImportanceScheduler(4, probe_layers=2, num_probes=2, importance_lr=10.0, rule="paper")
    kept = torch.tensor([[True, True, False, False], [False, True, True, False]])
    losses = torch.tensor([1.0, 3.0])
    r = ImportanceScheduler.rewards(losses)
    assert sched.update(kept, losses)
    expected = torch.tensor([10 * r[0], 10 * (r[0] + r[1]), 10 * r[1], 0.0])
    torch.testing.assert_close(sched.importance, expected)
    assert sched.num_updates == 1


def test_reference_update_is_reinforce_on_suppressed_layers_with_sigmoid_taken_once():
    sched = ImportanceScheduler(4, probe_layers=2, num_probes=2, importance_lr=100.0, rule="reference")
    start = torch.tensor([0.5, -1.0, 2.0, 0.0])
    sched.importance = start.clone()
    kept = torch.tensor([[True, True, False, False], [False, True, True, False]])
    losses = torch.tensor([2.0, 1.0])
    r = ImportanceScheduler.rewards(losses)
    # the released code, in its own sign: s = -I; s_i += mu * r_j * sig(s_i)(1 - sig(s_i)) for suppressed i,
    # the sigmoid taken once before the N_c updates.
    s = -start.clone()
    g = torch.sigmoid(s) * (1 - torch.sigmoid(s))
    for j in range(2):
        suppressed = ~kept[j]
        s[suppressed] += 100.0 * r[j] * g[suppressed]
    sched.update(kept, losses)
    torch.testing.assert_close(sched.importance, -s)


@pytest.mark.parametrize("rule", ["paper", "reference"])
def test_non_finite_losses_skip_the_update_and_are_counted(rule):
    sched = ImportanceScheduler(4, num_probes=2, rule=rule)
    kept = sched.sample_candidates()
    assert not sched.update(kept, torch.tensor([1.0, float("nan")]))
    assert not sched.update(kept, torch.tensor([float("inf"), 1.0]))
    assert torch.equal(sched.importance, torch.zeros(4))
    assert (sched.num_skipped, sched.num_updates) == (2, 0)


@pytest.mark.parametrize(
    "rule,reward", [("paper", "difference"), ("reference", "difference"), ("reference", "standardized")]
)
def test_state_dict_round_trip_continues_identically(rule, reward):
    a = ImportanceScheduler(8, num_probes=3, rule=rule, reward=reward, seed=11)
    for _ in range(3):
        kept = a.sample_candidates()
        a.update(kept, torch.rand(3) + kept[:, 0].double())
        a.sample_active()
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = ImportanceScheduler(8, num_probes=3, rule=rule, reward=reward, seed=999)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    assert b.active == a.active
    for _ in range(5):
        assert a.sample_active() == b.sample_active()
        ka, kb = a.sample_candidates(), b.sample_candidates()
        assert torch.equal(ka, kb)
        losses = torch.rand(3)
        a.update(ka, losses)
        b.update(kb, losses)
        assert torch.equal(a.importance, b.importance)


def test_load_rejects_other_layer_count_or_rule():
    state = ImportanceScheduler(8).state_dict()
    with pytest.raises(ValueError, match="layers"):
        ImportanceScheduler(6).load_state_dict(state)
    with pytest.raises(ValueError, match="rule"):
        ImportanceScheduler(8, rule="paper").load_state_dict(state)


def test_own_generator_leaves_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    sched = ImportanceScheduler(8, rule="paper")
    sched.sample_active()
    sched.sample_candidates()
    assert torch.equal(torch.rand(3), expected)
