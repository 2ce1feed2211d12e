"""The MID meta step against independent references, on tiny float64 models."""

import copy

import pytest
import torch
from torch import nn

from workers.mid import (FrozenTeacher, LossWeights, MetaSettings, draw_held_out,
                         meta_gradients, meta_objective)

ATTACKS = ["PGD_N", "PGD_T", "MIM_N", "MIM_T"]


def tiny_problem(seed=0):
    torch.manual_seed(seed)
    # Smooth activations: finite differences need a differentiable objective.
    student = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    teacher = FrozenTeacher(
        encoder=nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double(),
        classifier=nn.Linear(3, 2).double(),
        decoder=nn.Sequential(nn.Linear(3, 6), nn.Sigmoid()).double(),
    )
    clean = torch.rand(5, 6, dtype=torch.float64)
    views = {name: (clean + 0.3 * torch.randn_like(clean)).clamp(0, 1) for name in ATTACKS}
    labels = torch.randint(0, 2, (5,))
    return student, teacher, clean, views, labels


# A large inner step makes the second-order term big enough to matter in the comparison.
SETTINGS = MetaSettings(inner_lr=0.5, beta=1.0, temperature=2.0, second_order=True,
                        meta_train=LossWeights(1.5, 0.8, 1.0), meta_test=LossWeights(1.0, 1.0, 1.0))


def loss_value(student, teacher, clean, views, labels, held_out, settings):
    loss, _ = meta_objective(student, teacher, clean, views, labels, held_out, settings)
    return loss.item()


def finite_difference_gradient(student, teacher, clean, views, labels, held_out, settings, h=1e-6):
    """Central differences of the full meta loss L(θ), parameter by parameter."""
    grads = []
    for p in student.parameters():
        g = torch.zeros_like(p)
        for i in range(p.numel()):
            original = p.data.view(-1)[i].item()
            p.data.view(-1)[i] = original + h
            plus = loss_value(student, teacher, clean, views, labels, held_out, settings)
            p.data.view(-1)[i] = original - h
            minus = loss_value(student, teacher, clean, views, labels, held_out, settings)
            p.data.view(-1)[i] = original
            g.view(-1)[i] = (plus - minus) / (2 * h)
        grads.append(g)
    return grads


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("held_out", ["PGD_T", "MIM_N"])
def test_second_order_meta_gradient_matches_finite_differences(held_out):
    student, teacher, clean, views, labels = tiny_problem()
    loss, _ = meta_objective(student, teacher, clean, views, labels, held_out, SETTINGS)
    analytic = flat(meta_gradients(student, loss))
    reference = flat(finite_difference_gradient(student, teacher, clean, views, labels, held_out, SETTINGS))
    rel = (analytic - reference).norm() / reference.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_first_order_meta_gradient_matches_its_formula():
    """First order: ∇θ L = ∇J(θ; V) + β·∇J(θ'; {a*}) evaluated at the detached θ'."""
    settings = MetaSettings(**{**SETTINGS.__dict__, "second_order": False})
    student, teacher, clean, views, labels = tiny_problem()
    loss, _ = meta_objective(student, teacher, clean, views, labels, "PGD_N", settings)
    analytic = flat(meta_gradients(student, loss))

    # Reference built from plain modules: J on V at θ, a manual SGD step, J on {a*} at θ'.
    only_train = MetaSettings(**{**settings.__dict__, "beta": 0.0})
    j_train, _ = meta_objective(student, teacher, clean, views, labels, "PGD_N", only_train)
    g_train = meta_gradients(student, j_train)
    fast_student = copy.deepcopy(student)
    with torch.no_grad():
        for p, g in zip(fast_student.parameters(), g_train):
            p -= settings.inner_lr * g
    meta_test_only = {"PGD_N": views["PGD_N"]}
    from workers.mid import view_objective
    p_t = torch.softmax(teacher.encoder(clean) / settings.temperature, -1)
    j_test, _ = view_objective(fast_student, dict(fast_student.named_parameters()), teacher,
                               [meta_test_only["PGD_N"]], labels, p_t, settings.meta_test,
                               settings.temperature)
    g_test = meta_gradients(fast_student, j_test)
    reference = flat(g_train) + settings.beta * flat(g_test)
    assert torch.allclose(analytic, reference, rtol=1e-10, atol=1e-12)


def test_meta_test_loss_reaches_theta():
    """The meta-test term must change the gradient on θ (impossible if θ' were a fresh module)."""
    student, teacher, clean, views, labels = tiny_problem()
    with_meta, _ = meta_objective(student, teacher, clean, views, labels, "MIM_T", SETTINGS)
    without = MetaSettings(**{**SETTINGS.__dict__, "beta": 0.0})
    no_meta, _ = meta_objective(student, teacher, clean, views, labels, "MIM_T", without)
    g_with, g_without = flat(meta_gradients(student, with_meta)), flat(meta_gradients(student, no_meta))
    assert (g_with - g_without).norm() > 1e-3 * g_without.norm()


def test_second_order_term_is_present():
    student, teacher, clean, views, labels = tiny_problem()
    second, _ = meta_objective(student, teacher, clean, views, labels, "PGD_T", SETTINGS)
    first_settings = MetaSettings(**{**SETTINGS.__dict__, "second_order": False})
    first, _ = meta_objective(student, teacher, clean, views, labels, "PGD_T", first_settings)
    assert not torch.allclose(flat(meta_gradients(student, second)), flat(meta_gradients(student, first)))


def test_held_out_view_is_excluded_from_meta_train():
    """J(θ; V) must not depend on the held-out view; the meta-test loss must."""
    student, teacher, clean, views, labels = tiny_problem()
    _, base = meta_objective(student, teacher, clean, views, labels, "PGD_N", SETTINGS)
    changed = dict(views, PGD_N=torch.rand_like(views["PGD_N"]))
    _, after = meta_objective(student, teacher, clean, changed, labels, "PGD_N", SETTINGS)
    assert after["meta_train"] == pytest.approx(base["meta_train"], rel=1e-12)
    assert after["meta_test"] != pytest.approx(base["meta_test"], rel=1e-6)


def test_held_out_draw_is_uniform_and_shared_by_workers():
    draws = [draw_held_out(ATTACKS, seed=0, step=s) for s in range(4000)]
    assert draws == [draw_held_out(ATTACKS, seed=0, step=s) for s in range(4000)]
    for name in ATTACKS:
        assert 0.2 < draws.count(name) / len(draws) < 0.3


def test_views_one_pass_or_one_per_view_give_the_same_loss_and_meta_gradient():
    student, teacher, clean, views, labels = tiny_problem()
    results = []
    for batch_views in (True, False):
        settings = MetaSettings(**{**SETTINGS.__dict__, "batch_views": batch_views})
        loss, _ = meta_objective(student, teacher, clean, views, labels, "MIM_N", settings)
        results.append((loss.item(), flat(meta_gradients(student, loss))))
    assert abs(results[0][0] - results[1][0]) < 1e-12
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)


def test_bf16_autocast_keeps_the_second_order_meta_gradient():
    """mid.bf16 wraps the meta objective in autocast; the double backward must run through
    it and give the float32 gradient up to bf16 rounding. Checked with CPU autocast (the
    same autocast machinery the GPU path uses) on the real LeNet."""
    from workers.models import ModelSpec, build_encoder, build_teacher

    torch.manual_seed(0)
    spec = ModelSpec(arch="lenet", in_channels=1, image_size=16, num_classes=10)
    t = build_teacher(spec)
    teacher, student = FrozenTeacher(t.encoder, t.classifier, t.decoder), build_encoder(spec)
    clean = torch.rand(32, 1, 16, 16)
    views = {a: (clean + 0.1 * torch.rand_like(clean)).clamp(0, 1) for a in ATTACKS}
    labels = torch.randint(0, 10, (32,))
    settings = MetaSettings(inner_lr=0.1, second_order=True)
    loss, _ = meta_objective(student, teacher, clean, views, labels, "PGD_T", settings)
    reference = flat(meta_gradients(student, loss))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = meta_objective(student, teacher, clean, views, labels, "PGD_T", settings)
    mixed = flat(meta_gradients(student, loss))
    assert mixed.dtype == torch.float32  # parameters and their gradients stay float32
    assert torch.nn.functional.cosine_similarity(reference, mixed, dim=0) > 0.995
    assert (mixed - reference).norm() < 0.1 * reference.norm()


def reference_objective(student, teacher, clean, views, labels, weights, temperature):
    """J(θ; views) written out with plain modules, independently of ``view_objective``."""
    p_t = torch.softmax(teacher.encoder(clean) / temperature, 1)
    p_clean = torch.softmax(teacher.classifier(student(clean)), 1)  # RC's target, moved by θ too
    total = 0.0
    for x in views:
        z = student(x)
        log_q = torch.log_softmax(z / temperature, 1)
        ac = (p_t * (p_t.log() - log_q)).sum(1).mean()
        log_c = torch.log_softmax(teacher.encoder(teacher.decoder(z)) / temperature, 1)
        cc = (p_t * (p_t.log() - log_c)).sum(1).mean()
        lc = nn.functional.cross_entropy(teacher.classifier(z), labels)
        rc = (p_clean * (p_clean.log() - torch.log_softmax(teacher.classifier(z), 1))).sum(1).mean()
        total = total + weights.ac * ac + weights.cc * cc + weights.lc * lc + weights.rc * rc
    return total


def test_the_robustness_term_is_trades_kl_and_its_meta_gradient_matches_finite_differences():
    """ω_RC (TRADES' KL, an option for MID-R): without meta-learning the objective equals the
    written-out reference, the clean view adding nothing; with it, the second-order meta
    gradient (RC in both phases, the held-out view against the fast weights' clean
    prediction) matches central differences, and RC changes the loss."""
    weights = LossWeights(1.5, 0.8, 1.0, rc=2.0)
    with_rc = MetaSettings(**{**SETTINGS.__dict__, "meta_train": weights,
                              "meta_test": LossWeights(1.0, 1.0, 1.0, rc=3.0)})
    student, teacher, clean, views, labels = tiny_problem()
    flat_settings = MetaSettings(**{**with_rc.__dict__, "meta": False})
    loss, metrics = meta_objective(student, teacher, clean, views, labels, "PGD_T", flat_settings)
    reference = reference_objective(student, teacher, clean, [clean, *views.values()], labels, weights,
                                    with_rc.temperature)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-10) and metrics["rc"] > 0
    assert torch.allclose(flat(meta_gradients(student, loss)), flat(meta_gradients(student, reference)),
                          rtol=1e-10, atol=1e-12)
    loss, metrics = meta_objective(student, teacher, clean, views, labels, "MIM_N", with_rc)
    analytic = flat(meta_gradients(student, loss))
    fd = flat(finite_difference_gradient(student, teacher, clean, views, labels, "MIM_N", with_rc))
    assert (analytic - fd).norm() / fd.norm() < 1e-4
    without, _ = meta_objective(student, teacher, clean, views, labels, "MIM_N", SETTINGS)
    assert loss.item() > without.item() + 1e-6
    # The meta-test phase: the held-out view's RC against the fast weights' clean prediction.
    only_train = MetaSettings(**{**with_rc.__dict__, "beta": 0.0})
    g_train = meta_gradients(student, meta_objective(student, teacher, clean, views, labels, "MIM_N", only_train)[0])
    fast_student = copy.deepcopy(student)
    with torch.no_grad():
        for p, g in zip(fast_student.parameters(), g_train):
            p -= with_rc.inner_lr * g
    j_test = reference_objective(fast_student, teacher, clean, [views["MIM_N"]], labels, with_rc.meta_test,
                                 with_rc.temperature)
    assert metrics["meta_test"] == pytest.approx(j_test.item(), rel=1e-10)


def test_without_meta_learning_the_step_is_the_multi_view_objective():
    """Table 8's 'no meta': L = J(θ; {clean} ∪ A), every attack a training view, whichever is drawn."""
    settings = MetaSettings(**{**SETTINGS.__dict__, "meta": False})
    student, teacher, clean, views, labels = tiny_problem()
    loss, metrics = meta_objective(student, teacher, clean, views, labels, "PGD_T", settings)
    reference = reference_objective(student, teacher, clean, [clean, *views.values()], labels,
                                    settings.meta_train, settings.temperature)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-10) and metrics["meta_test"] == 0.0
    assert torch.allclose(flat(meta_gradients(student, loss)), flat(meta_gradients(student, reference)),
                          rtol=1e-10, atol=1e-12)
    other, _ = meta_objective(student, teacher, clean, views, labels, "MIM_N", settings)
    assert other.item() == loss.item()  # nothing is held out


def test_without_distillation_no_teacher_feature_reaches_the_student():
    """Table 8's 'no distillation': only LC is left in both phases; the teacher's encoder
    and decoder no longer matter, and the meta gradient matches finite differences."""
    settings = MetaSettings(**{**SETTINGS.__dict__, "distill": False})
    student, teacher, clean, views, labels = tiny_problem()
    loss, metrics = meta_objective(student, teacher, clean, views, labels, "MIM_T", settings)
    assert metrics["ac"] == 0.0 and metrics["cc"] == 0.0 and metrics["lc"] > 0
    _, other_teacher, *_ = tiny_problem(seed=1)
    swapped = FrozenTeacher(other_teacher.encoder, teacher.classifier, other_teacher.decoder)
    again, _ = meta_objective(student, swapped, clean, views, labels, "MIM_T", settings)
    assert again.item() == loss.item()
    analytic = flat(meta_gradients(student, loss))
    reference = flat(finite_difference_gradient(student, teacher, clean, views, labels, "MIM_T", settings))
    assert (analytic - reference).norm() / reference.norm() < 1e-4
    with_teacher, _ = meta_objective(student, teacher, clean, views, labels, "MIM_T", SETTINGS)
    assert with_teacher.item() != pytest.approx(loss.item(), rel=1e-6)


def test_a_trainable_classifier_starts_as_c_t_and_its_meta_gradient_matches_finite_differences():
    """mid.classifier: trainable. The student carries a copy of C_t: at the start the meta
    loss equals the frozen-C_t one, and the second-order meta gradient, now reaching the
    classifier's weights too, matches central differences."""
    from workers.mid import StudentWithClassifier

    student, teacher, clean, views, labels = tiny_problem()
    with_head = StudentWithClassifier(copy.deepcopy(student), copy.deepcopy(teacher.classifier).requires_grad_(True))
    _, frozen = meta_objective(student, teacher, clean, views, labels, "PGD_T", SETTINGS)
    loss, own = meta_objective(with_head, teacher, clean, views, labels, "PGD_T", SETTINGS)
    # The same meta-train loss; the meta-test one differs: the inner step now moves C_s too.
    assert own["meta_train"] == pytest.approx(frozen["meta_train"], rel=1e-12)
    assert own["meta_test"] != pytest.approx(frozen["meta_test"], rel=1e-6)
    analytic = meta_gradients(with_head, loss)
    names = [name for name, _ in with_head.named_parameters()]
    assert any(n.startswith("classifier.") for n in names)
    assert all(g.abs().sum() > 0 for n, g in zip(names, analytic) if n.startswith("classifier."))
    reference = flat(finite_difference_gradient(with_head, teacher, clean, views, labels, "PGD_T", SETTINGS))
    rel = (flat(analytic) - reference).norm() / reference.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"
