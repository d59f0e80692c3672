"""The Nesterov-corrected optimizer and the SPARTA partition: the math, checked directly."""

import subprocess
import sys

import pytest
import torch

from agora_server.optim import (
    NesterovAdamW,
    OptimizerConfig,
    SpartaPartition,
    build_optimizer,
    linear_momentum_warmup,
    slice_count,
    slice_for_epoch,
)


def test_update_matches_a_hand_computed_reference_through_the_momentum_warmup():
    """Four steps on one weight with μ rising 0.5 → 0.9 over three steps, written out by hand."""
    import math

    lr, beta2, eps, wd = 0.1, 0.999, 1e-8, 0.01
    mu = {1: 0.5, 2: 0.7, 3: 0.9, 4: 0.9, 5: 0.9}
    grads = [1.0, -2.0, 0.5, 3.0]
    theta, m, v, product = 1.0, 0.0, 0.0, 1.0
    expected = []
    for t, g in enumerate(grads, start=1):
        theta *= 1 - lr * wd
        m = mu[t] * m + (1 - mu[t]) * g
        v = beta2 * v + (1 - beta2) * g * g
        product *= mu[t]
        look_ahead = (mu[t + 1] * m + (1 - mu[t + 1]) * g) / (1 - product * mu[t + 1])
        theta -= lr * look_ahead / (math.sqrt(v / (1 - beta2**t)) + eps)
        expected.append(theta)

    p = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    opt = NesterovAdamW([p], lr=lr, betas=(0.9, beta2), eps=eps, weight_decay=wd, momentum_schedule=linear_momentum_warmup(0.9, 0.5, 3))
    for g, want in zip(grads, expected):
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        assert float(p.detach()) == pytest.approx(want, rel=1e-12)


def test_steps_are_adams_size_from_the_first_one():
    """Under a constant gradient the look-ahead average is the gradient itself, whatever μ does: the
    optimizer moves exactly as Adam does (torch's NAdam, averaging at a fixed β1, moves 0.4-0.6 as far)."""
    ours_p = torch.zeros(5, requires_grad=True)
    adam_p = torch.zeros(5, requires_grad=True)
    ours = NesterovAdamW([ours_p], lr=1e-2, betas=(0.99, 0.999), momentum_schedule=linear_momentum_warmup(0.99, 0.5, 50))
    adam = torch.optim.Adam([adam_p], lr=1e-2, betas=(0.99, 0.999))
    gradient = torch.tensor([1.0, -2.0, 0.3, 5.0, -0.1])
    for _ in range(100):
        ours_p.grad, adam_p.grad = gradient.clone(), gradient.clone()
        ours.step()
        adam.step()
    assert torch.allclose(ours_p, adam_p, rtol=1e-5, atol=1e-6)


def test_momentum_warmup_is_explicit_and_linear():
    mu = linear_momentum_warmup(0.99, 0.5, 50)
    assert mu(1) == 0.5 and mu(50) == pytest.approx(0.99) and mu(500) == pytest.approx(0.99)
    assert mu(25) == pytest.approx(0.5 + 0.49 * 24 / 49)
    assert linear_momentum_warmup(0.99, 0.5, 0)(1) == 0.99


def test_weight_decay_is_decoupled():
    p = torch.ones(4, requires_grad=True)
    opt = NesterovAdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros(4)
    opt.step()
    assert torch.allclose(p, torch.full((4,), 0.95)), "with zero gradient only the decay lr·wd·θ applies"


def test_config_selects_the_optimizer_and_minimises_a_quadratic():
    model = torch.nn.Linear(8, 1)
    # β1 = 0.9: a momentum horizon of 10 steps suits a 400-step run (0.99's 100 would be a quarter of it)
    opt, _ = build_optimizer(model, OptimizerConfig(name="nesterov", lr=0.2, betas=(0.9, 0.999), momentum_warmup_steps=10, weight_decay=0.0))
    assert isinstance(opt, NesterovAdamW)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    y = x @ torch.arange(8.0).unsqueeze(1)
    first = None
    for _ in range(400):
        loss = ((model(x) - y) ** 2).mean()
        first = first or float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < first * 1e-4


def test_partition_covers_every_coordinate_once_per_cycle():
    numels = [1000, 37, 1]
    part = SpartaPartition(numels, fraction=0.05, seed=9)
    assert part.slices == 20
    for i, n in enumerate(numels):
        seen = torch.cat([part.indices(i, r) for r in range(5, 5 + part.slices)])  # any K consecutive rounds
        assert torch.equal(seen.sort().values, torch.arange(n))
        sizes = [len(part.indices(i, r)) for r in range(part.slices)]
        assert max(sizes) - min(sizes) <= 1


def test_partition_is_identical_in_another_process():
    code = (
        "from agora_server.optim import SpartaPartition;"
        "p = SpartaPartition([500, 64], 0.1, 42);"
        "print([p.indices(i, r).tolist() for i in range(2) for r in range(10)])"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    here = SpartaPartition([500, 64], 0.1, 42)
    assert other == str([here.indices(i, r).tolist() for i in range(2) for r in range(10)])
    assert not torch.equal(SpartaPartition([500], 0.1, 43).indices(0, 0), here.indices(0, 0)), "seed must matter"


def peers_average(replicas, part, round_index):
    slices = [part.gather(r, round_index) for r in replicas]
    return [torch.stack(parts).mean(0) for parts in zip(*slices)]


def test_averaging_identical_replicas_changes_nothing():
    weights = [torch.randn(30), torch.randn(4, 5)]
    replicas = [[w.clone() for w in weights] for _ in range(3)]
    part = SpartaPartition([w.numel() for w in weights], 0.25, 0)
    for r in range(part.slices):
        for rep in replicas:
            snapshot = part.gather(rep, r)
            part.apply_delta(rep, r, snapshot, peers_average(replicas, part, r))
    for rep in replicas:  # (x + x + x) / 3 may round: equal to float precision
        assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(rep, weights))


def test_delta_rule_keeps_local_steps_taken_during_the_round():
    part = SpartaPartition([6], 1.0, 0)
    mine, theirs = [torch.zeros(6)], [torch.full((6,), 2.0)]
    snapshot = part.gather(mine, 0)
    averaged = peers_average([mine, theirs], part, 0)  # 1.0 everywhere, computed in the background
    mine[0] += 0.25  # a local optimizer step lands while the round runs
    part.apply_delta(mine, 0, snapshot, averaged)
    assert torch.allclose(mine[0], torch.full((6,), 1.25))


def test_p_one_is_full_averaging():
    part = SpartaPartition([10, 3], 1.0, 5)
    assert part.slices == 1
    replicas = [[torch.randn(10), torch.randn(3)] for _ in range(4)]
    expected = [torch.stack([r[i] for r in replicas]).mean(0) for i in range(2)]
    averaged = peers_average(replicas, part, 0)
    for rep in replicas:
        part.apply_delta(rep, 0, part.gather(rep, 0), averaged)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(rep, expected))


def test_slice_schedule_and_fraction_bounds():
    assert [slice_for_epoch(e, 5, 4) for e in (0, 5, 10, 15, 20, 25)] == [0, 1, 2, 3, 0, 1]
    assert slice_count(0.05) == 20 and slice_count(0.3) == 4 and slice_count(1.0) == 1
    with pytest.raises(ValueError):
        slice_count(0.0)


def test_overshoot_shares_add_up_to_the_overshoot():
    from agora_server.optim.progress import overshoot_share

    assert overshoot_share(12, 24, 16) + overshoot_share(12, 24, 16) == 8
    assert overshoot_share(6, 30, 16) + overshoot_share(24, 30, 16) == 14
    assert overshoot_share(10, 16, 16) == 0 and overshoot_share(0, 20, 16) == 0


def test_trainers_keep_at_most_half_an_epoch_in_flight():
    from agora_server.pipeline import TrainerConfig, in_flight_limit

    config = TrainerConfig(micro_batch_size=4, max_in_flight=6)
    assert in_flight_limit(config, target_batch_size=32) == 4  # 16 of 32 samples
    assert in_flight_limit(config, target_batch_size=32, trainers=2) == 2
    assert in_flight_limit(config, target_batch_size=2048) == 6  # long epochs: max_in_flight decides
    assert in_flight_limit(config, target_batch_size=4) == 1  # never starved of every micro-batch
    assert in_flight_limit(config.model_copy(update={"max_delay_epochs": None}), target_batch_size=4) == 6
