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
