"""The refresh step (workers/pool_generation.continue_attack) against an independent
reference: a hand-written loop of signed-gradient steps with projection, from the same
starting images; and the properties a refreshed pool relies on."""

import torch
from torch import nn

from workers.pool_generation import continue_attack


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).eval().requires_grad_(False)


def reference(net, clean, start, goal, eps, step, steps, targeted):
    """Each step: x ← clip(clean + clip(x + step·sign(∇ ±CE) − clean, ±ε), 0, 1)."""
    x = start.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        loss = nn.functional.cross_entropy(net(x), goal, reduction="sum")
        (grad,) = torch.autograd.grad(-loss if targeted else loss, x)
        x = x.detach() + step * grad.sign()
        x = (clean + (x - clean).clamp(-eps, eps)).clamp(0, 1)
    return x


def batch():
    generator = torch.Generator().manual_seed(1)
    clean = torch.rand(16, 1, 8, 8, generator=generator)
    start = (clean + 0.2 * (2 * torch.rand(clean.shape, generator=generator) - 1)).clamp(0, 1)
    labels = torch.randint(0, 10, (16,), generator=generator)
    return clean, start, labels


def test_continuing_matches_the_reference_loop():
    net, (clean, start, labels) = model(), batch()
    for targeted in (False, True):
        goal = (labels + 3) % 10 if targeted else labels
        got = continue_attack(net, clean, start, goal, 0.3, 0.05, 4, targeted)
        want = reference(net, clean, start, goal, 0.3, 0.05, 4, targeted)
        assert torch.allclose(got, want, atol=1e-6)


def test_a_continued_view_stays_in_the_ball_and_moves_from_where_it_was():
    net, (clean, start, labels) = model(), batch()
    got = continue_attack(net, clean, start, labels, 0.3, 0.01, 3, False)
    assert (got - clean).abs().max() <= 0.3 + 1e-6 and got.min() >= 0 and got.max() <= 1
    # Warm-started: 3 steps of 0.01 move no pixel more than 0.03 from the carried image
    # (a restart from the clean image would sit near the clean image instead).
    assert (got - start).abs().max() <= 0.03 + 1e-6
    assert (got - start).abs().max() > 0
    # And the untargeted loss went up.
    loss = nn.functional.cross_entropy
    assert loss(net(got), labels) > loss(net(start), labels)


def test_staleness_zero_continues_a_batch_and_carries_it_in_the_workers_rows(tmp_path):
    """``CarriedViews`` (pool.refresh.every 0): the batch's views become the reference loop's
    continuation, rounded onto the store's grid, and the worker's rows carry them (the next
    read of those rows, and the round's carried file, see the continued views)."""
    import numpy as np

    from storage.pools import quantize
    from workers.jobs import InStepRefresh, RefreshedAttack
    from workers.models import to_float
    from workers.refresh_in_step import CarriedViews
    from workers.reproducible import WorkerRows

    net, (clean, start, labels) = model(), batch()
    trained = net.train().requires_grad_(True)
    clean_u8 = (clean * 255).round().to(torch.uint8)
    start_u8 = torch.from_numpy(quantize(start.numpy(), clean_u8.numpy(), 0.3))
    rows = WorkerRows(None, in_memory=True)
    rows.rows = {"index": torch.arange(100, 116), "label": labels, "clean": clean_u8, "PGD_N": start_u8.clone()}
    # Steps of 0.04 (10.2 grey levels): no continued pixel sits on a rounding boundary, where
    # two float orders of the same sums could round apart.
    settings = InStepRefresh((RefreshedAttack("PGD_N", 0.3, 0.04, False),), steps=2, delta_step=1)
    carried = CarriedViews(settings, rows, str(tmp_path), {}, 100, 116)
    picked = torch.tensor([3, 7, 11])
    the_batch = {name: values[picked].clone() for name, values in rows.rows.items()}
    carried.continue_batch(trained, trained, the_batch)
    assert trained.training and all(p.requires_grad for p in trained.parameters())  # it trains on afterwards
    want = reference(net.eval().requires_grad_(False), to_float(clean_u8[picked]), to_float(start_u8[picked]),
                     labels[picked], 0.3, 0.04, 2, False)
    want_u8 = torch.from_numpy(quantize(want.numpy(), clean_u8[picked].numpy(), 0.3))
    assert torch.equal(the_batch["PGD_N"], want_u8)
    assert torch.equal(rows.rows["PGD_N"][picked], want_u8)  # carried in the worker's rows
    others = torch.tensor([i for i in range(16) if i not in picked.tolist()])
    assert torch.equal(rows.rows["PGD_N"][others], start_u8[others])  # the rest untouched
    assert (rows.rows["PGD_N"][picked] != start_u8[picked]).any()
    np.testing.assert_array_equal(rows.column("index").numpy(), np.arange(100, 116))


def test_in_an_eps_warmup_epoch_the_carried_view_is_continued_inside_the_smaller_ball(tmp_path):
    """ATTA at staleness zero takes AT's ε warm-up: in epoch e < W the view is continued, and
    projected, inside (e+1)/W · ε with (e+1)/W of the step; from epoch W on, the whole ball."""
    from storage.pools import ball_radius, quantize
    from workers.jobs import InStepRefresh, RefreshedAttack
    from workers.models import to_float
    from workers.refresh_in_step import CarriedViews
    from workers.reproducible import WorkerRows

    settings = InStepRefresh((RefreshedAttack("PGD_N", 0.3, 0.04, False),), steps=2, delta_step=1,
                             eps_warmup_epochs=4)
    assert [settings.eps_scale(e) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    net, (clean, start, labels) = model(), batch()
    clean_u8 = (clean * 255).round().to(torch.uint8)
    start_u8 = torch.from_numpy(quantize(start.numpy(), clean_u8.numpy(), 0.3))
    rows = WorkerRows(None, in_memory=True)
    rows.rows = {"index": torch.arange(16), "label": labels, "clean": clean_u8, "PGD_N": start_u8.clone()}
    carried = CarriedViews(settings, rows, str(tmp_path), {}, 0, 16, settings.eps_scale(1))
    the_batch = {name: values.clone() for name, values in rows.rows.items()}
    carried.continue_batch(net, net, the_batch)
    moved = (the_batch["PGD_N"].int() - clean_u8.int()).abs()
    assert moved.max() <= ball_radius(0.15) < (start_u8.int() - clean_u8.int()).abs().max()
    want = reference(net, to_float(clean_u8), to_float(start_u8), labels, 0.15, 0.02, 2, False)
    assert torch.equal(the_batch["PGD_N"], torch.from_numpy(quantize(want.numpy(), clean_u8.numpy(), 0.15)))
