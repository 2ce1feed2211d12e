"""The paper's unknown attacks that are not L∞ PGD relatives: CW (advertorch, L2), JSMA
(advertorch, L0) and AutoAttack (IBM ART, L∞), each on a small real model: a LeNet trained
on the digits. Each must fool most samples of this plain classifier and keep its constraint."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from storage.pools import quantize
from storage.readers.base import resize_images
from storage.readers.digits import load_digits
from workers.attacks import make_attack, make_targets
from workers.models import ModelSpec, build_classifier_model, to_float

SETTINGS = {
    "CW": {"max_iterations": 100, "binary_search_steps": 4, "confidence": 1.0, "initial_const": 1.0,
           "learning_rate": 0.1},
    "JSMA": {"theta": 1.0, "gamma": 1.0, "chunk": 16},
    "AA": {"eps": 0.3, "version": "standard", "batch_size": 64},
}


@pytest.fixture(scope="module")
def plain_classifier():
    """(model, 48 correctly classified test images, their labels)."""
    raw = load_digits(test_fraction=0.2, seed=0)
    (train_x, train_y), (test_x, test_y) = raw.split("train"), raw.split("test")
    train_x, test_x = (to_float(torch.from_numpy(resize_images(x, 16))) for x in (train_x, test_x))
    train_y, test_y = torch.from_numpy(train_y), torch.from_numpy(test_y)
    torch.manual_seed(0)
    model = build_classifier_model(ModelSpec("lenet", 1, 16, 10))
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(8):
        for i in range(0, len(train_y), 64):
            loss = F.cross_entropy(model(train_x[i:i + 64]), train_y[i:i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        right = model(test_x).argmax(1) == test_y
    assert right.float().mean() > 0.9
    return model, test_x[right][:48], test_y[right][:48]


@pytest.mark.parametrize("name", ["CW_N", "CW_T", "JSMA_T", "AA_N"])
def test_unknown_attack_fools_a_plain_classifier_within_its_threat_model(plain_classifier, name):
    model, x, y = plain_classifier
    attack = make_attack(name, SETTINGS)
    targets = make_targets(y, 10, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    adv = attack.perturb(model, x, y, targets)
    assert adv.shape == x.shape and adv.min() >= 0 and adv.max() <= 1
    pred = model(adv).argmax(1)
    rate = ((pred == targets) if attack.targeted else (pred != y)).float().mean()
    assert rate > 0.8, f"{name} succeeded on only {rate:.0%} of a plain classifier's samples"
    change = (adv - x).flatten(1)
    if attack.threat_model == "linf":
        assert attack.eps == 0.3 and change.abs().max() <= 0.3 + 1e-6
    elif attack.threat_model == "l2":  # the smallest change that flips the label: far below the image's norm
        assert attack.eps is None and change.norm(dim=1).median() < 0.5 * x.flatten(1).norm(dim=1).median()
    else:  # L0: JSMA changes a minority of the pixels (γ = 1 allows all of them)
        assert attack.eps is None and (change != 0).float().mean(1).median() < 0.25
    if attack.eps is None:  # stored as uint8 images, only rounded: there is no ε-ball to project into
        clean_u8 = (x * 255).round().to(torch.uint8).numpy()
        rounded = np.clip(np.rint(adv.numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8)
        assert np.array_equal(quantize(adv.numpy(), clean_u8, None), rounded)


def test_cw_at_the_authors_learning_rate_is_weak_and_says_so(plain_classifier):
    """At learning rate 0.01 CW barely moves pixels (docs/design.md §4, §6.4): a weak setting is visible as a
    low success rate, which the report shows under each table."""
    model, x, y = plain_classifier
    weak = make_attack("CW_N", {"CW": {**SETTINGS["CW"], "learning_rate": 0.01, "max_iterations": 20}})
    strong = make_attack("CW_N", SETTINGS)
    rates = [(model(a.perturb(model, x, y)).argmax(1) != y).float().mean() for a in (weak, strong)]
    assert rates[0] < rates[1]


def test_fixed_targets_aim_every_sample_at_one_label():
    y = torch.tensor([0, 3, 7, 0])
    assert make_targets(y, 10, torch.Generator(), 0).tolist() == [0, 0, 0, 0]
    assert not (make_targets(y, 10, torch.Generator().manual_seed(0), "random") == y).any()
