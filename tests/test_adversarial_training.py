"""The AT and TRADES objectives: real advertorch PGD against the model being trained."""

import torch
import torch.nn.functional as F

from workers.adversarial_training import frozen_for_attack, madry_loss, pgd, trades_loss
from workers.models import ModelSpec, build_classifier_model

SPEC = ModelSpec(arch="lenet", in_channels=1, image_size=16, num_classes=10)
ATTACK = {"eps": 0.1, "nb_iter": 5, "eps_iter": 0.04, "rand_init": True}


def problem():
    torch.manual_seed(0)
    model = build_classifier_model(SPEC)
    x = torch.rand(32, 1, 16, 16)
    return model, x, model(x).argmax(1).detach()  # labels the model gets right: PGD must break them


def test_madry_loss_trains_on_perturbed_inputs_inside_the_ball():
    model, x, y = problem()
    seen = []
    handle = model.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach()))
    loss, logits = madry_loss(model, model, x, y, ATTACK)
    handle.remove()
    trained_on = seen[-1]  # the last forward is the training forward, on x_adv
    assert (trained_on - x).abs().max() <= ATTACK["eps"] + 1e-6 and (trained_on - x).abs().max() > 0.05
    assert 0 <= trained_on.min() and trained_on.max() <= 1
    assert loss.item() > F.cross_entropy(model(x), y).item()  # the attack raised the loss
    assert loss.requires_grad and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # the attack computed no weight gradients


def test_trades_reduces_to_cross_entropy_at_beta_zero_and_grows_with_beta():
    model, x, y = problem()
    torch.manual_seed(1)
    plain, _ = trades_loss(model, model, x, y, ATTACK, beta=0.0)
    torch.testing.assert_close(plain, F.cross_entropy(model(x), y))
    torch.manual_seed(1)
    robust, _ = trades_loss(model, model, x, y, ATTACK, beta=6.0)
    assert robust.item() > plain.item()  # the KL to the clean prediction is positive


def test_trades_attack_maximizes_the_kl():
    model, x, _ = problem()
    p_clean = F.softmax(model(x), 1).detach()
    kl = lambda x_: F.kl_div(F.log_softmax(model(x_), 1), p_clean, reduction="sum").item()  # noqa: E731
    random = (x + torch.empty_like(x).uniform_(-0.1, 0.1)).clamp(0, 1)
    with frozen_for_attack(model):
        from workers.adversarial_training import _kl_to_clean
        x_adv = pgd(model, ATTACK, loss_fn=_kl_to_clean).perturb(x, p_clean)
    assert kl(x_adv) > 2 * kl(random)


def test_frozen_for_attack_restores_the_model():
    model, _, _ = problem()
    model.train()
    model.classifier.requires_grad_(False)
    with frozen_for_attack(model):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == [True] * 8 + [False] * 2
