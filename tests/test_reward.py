"""reward="standardized": rewards divided by their std over a round's candidates (opt-in; default unchanged)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import lm_batch, tiny_peft_llama

from ist_optim import ISTAdamW, ImportanceScheduler


def standardized_by_hand(losses: list[float]) -> list[float]:
    """float64, written out: v = exp(-L), r = (v - mean v) / sqrt(mean (v - mean v)^2)."""
    v = [math.exp(-x) for x in losses]
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / len(v))
    return [(x - mean) / sd for x in v]


def test_standardized_rewards_match_hand_computation():
    losses = [0.31, 0.52, 0.47, 1.9]
    got = ImportanceScheduler.rewards(torch.tensor(losses, dtype=torch.float64), "standardized")
    assert got.tolist() == pytest.approx(standardized_by_hand(losses), rel=1e-6, abs=1e-7)
    assert float((got.double() ** 2).sum()) == pytest.approx(4.0, rel=1e-6)  # squares sum to N_c


def test_default_rewards_are_still_the_papers_difference():
    losses = torch.tensor([0.31, 0.52, 0.47], dtype=torch.float64)
    v = [math.exp(-x) for x in losses.tolist()]
    expected = [x - sum(v) / 3 for x in v]
    assert ImportanceScheduler.rewards(losses).tolist() == pytest.approx(expected, rel=1e-6)
    assert ImportanceScheduler(8).reward == "difference"


def test_standardized_rewards_do_not_depend_on_the_loss_scale():
    """exp(-L) scaled by a (L shifted by -log a): difference rewards scale by a, standardized ones do not."""
    losses = torch.tensor([0.9, 1.1, 1.4], dtype=torch.float64)
    shifted = losses - math.log(3.0)
    assert torch.allclose(
        ImportanceScheduler.rewards(shifted, "standardized"),
        ImportanceScheduler.rewards(losses, "standardized"),
        atol=1e-6,
    )
    assert torch.allclose(ImportanceScheduler.rewards(shifted), 3.0 * ImportanceScheduler.rewards(losses), atol=1e-6)


def test_equal_losses_give_zero_rewards_not_nan():
    sched = ImportanceScheduler(6, num_probes=3, probe_layers=1, reward="standardized", importance_lr=4.0, seed=0)
    kept = sched.sample_candidates()
    assert sched.update(kept, torch.full((3,), 0.7))
    assert torch.equal(sched.importance, torch.zeros(6))
    assert sched.num_updates == 1


@pytest.mark.parametrize("rule", ["reference", "paper"])
def test_update_with_standardized_rewards_matches_hand_computation(rule):
    """Two updates from a non-zero importance, both rules, against float64 arithmetic written out."""
    num_layers, mu = 6, 4.0
    sched = ImportanceScheduler(
        num_layers, num_probes=3, probe_layers=2, importance_lr=mu, rule=rule, reward="standardized", seed=5
    )
    start = [0.3, -0.8, 0.0, 1.2, -0.1, 0.5]
    sched.importance = torch.tensor(start)
    expected = [float(x) for x in sched.importance.tolist()]  # the float32 start, in float64
    for losses in ([1.20, 1.05, 1.31], [0.64, 0.66, 0.61]):
        kept = sched.sample_candidates()
        r = standardized_by_hand(losses)
        sig = [1.0 / (1.0 + math.exp(-x)) for x in expected]
        for i in range(num_layers):
            if rule == "paper":  # I_i += mu * r_j for i kept in candidate j
                expected[i] += mu * sum(r[j] for j in range(3) if kept[j, i])
            else:  # I_i -= mu * r_j * s(1 - s) for i suppressed in candidate j, s taken before the round
                expected[i] -= mu * sig[i] * (1.0 - sig[i]) * sum(r[j] for j in range(3) if not kept[j, i])
        assert sched.update(kept, torch.tensor(losses))
        assert sched.importance.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(expected, start)) > 0.5  # the update did move importance


def test_bad_reward_raises():
    with pytest.raises(ValueError, match="reward"):
        ImportanceScheduler(8, reward="zscore")
    with pytest.raises(ValueError, match="reward"):
        ISTAdamW(tiny_peft_llama(), reward="normalised")
    with pytest.raises(ValueError, match="reward"):  # checked whatever the policy
        ISTAdamW(tiny_peft_llama(), policy="random", reward="ranked")


def test_scheduler_checkpoint_keeps_the_reward_and_refuses_another():
    """The round trip itself is test_scheduler's (parametrized over reward); here: the reward is saved and checked."""
    state = ImportanceScheduler(8, num_probes=3, probe_layers=1, reward="standardized", seed=3).state_dict()
    assert state["reward"] == "standardized"
    with pytest.raises(ValueError, match="reward"):
        ImportanceScheduler(8, num_probes=3, probe_layers=1).load_state_dict(state)


def test_checkpoint_from_before_the_option_loads_as_difference():
    state = ImportanceScheduler(8).state_dict()
    del state["reward"]
    ImportanceScheduler(8).load_state_dict(state)
    with pytest.raises(ValueError, match="reward"):
        ImportanceScheduler(8, reward="standardized").load_state_dict(state)


def test_optimizer_applies_standardized_rewards_to_its_probe_losses():
    """ISTAdamW(reward="standardized"): each round's update equals the hand computation from that round's losses."""
    model = tiny_peft_llama(num_layers=6)
    mu = 4.0
    opt = ISTAdamW(
        model,
        lr=1e-2,
        active_layers=2,
        probe_layers=1,
        num_probes=3,
        probe_interval=2,
        importance_lr=mu,
        reward="standardized",
        seed=2,
    )
    assert opt.options["reward"] == "standardized"
    rounds = []
    update = opt.scheduler.update

    def recording_update(kept, losses):
        before = [float(x) for x in opt.scheduler.importance.tolist()]
        applied = update(kept, losses)
        rounds.append((before, kept.clone(), losses.tolist(), opt.scheduler.importance.tolist()))
        return applied

    opt.scheduler.update = recording_update
    for step in range(6):
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert len(rounds) == 3
    for before, kept, losses, after in rounds:
        assert len(set(losses)) == 3  # distinct losses: the adapters (B != 0) matter
        r = standardized_by_hand(losses)
        expected = list(before)
        for i in range(6):
            s = 1.0 / (1.0 + math.exp(-before[i]))
            expected[i] -= mu * s * (1.0 - s) * sum(r[j] for j in range(3) if not kept[j, i])
        assert after == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # one suppressed layer per candidate: three layers move per round, by mu * 0.25 * |r| at importance 0
    assert (torch.tensor(rounds[0][3]) != 0).sum() == 3


def test_optimizer_checkpoint_records_the_reward_option():
    model = tiny_peft_llama()
    opt = ISTAdamW(model, lr=1e-2, probe_interval=2, reward="standardized", probe_layers=1, seed=0)
    for step in range(4):
        model(**lm_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    assert state["ist"]["options"]["reward"] == "standardized"
    assert state["ist"]["scheduler"]["reward"] == "standardized"
    other = ISTAdamW(tiny_peft_llama(), lr=1e-2, probe_interval=2, probe_layers=1, seed=0)
    with pytest.raises(ValueError, match="reward"):
        other.load_state_dict(state)
