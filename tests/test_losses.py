"""The losses against hand-written formulas (an independent oracle) and their identities."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdtune.losses import (
    LOSSES,
    UNLABELLED,
    dist_loss,
    dkd_loss,
    dkd_parts,
    hinton_loss,
    lskd_loss,
    mse_loss,
    reference_loss,
)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3, torch.tensor([0, 1, 2, 3, 4, 0])


def oracle_kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def oracle_softmax(z: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def oracle_ce(z: list[float], label: int) -> float:
    return -math.log(oracle_softmax(z, 1.0)[label])


def test_hinton_matches_the_hand_written_formula(batch):
    student, teacher, labels = batch
    t, lam = 4.0, 0.3
    expected = sum(lam * oracle_ce(s, y) + (1 - lam) * t * t * oracle_kl(oracle_softmax(z, t), oracle_softmax(s, t))
                   for s, z, y in zip(student.tolist(), teacher.tolist(), labels.tolist())) / len(labels)
    got = hinton_loss(student, teacher, labels, temperature=t, label_weight=lam)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_reference_matches_the_seed_projects_formula(batch):
    student, teacher, labels = batch
    t, lam = 10.0, 0.5
    expected = sum(lam * oracle_ce(s, y) - sum(p * math.log(q) for p, q in zip(oracle_softmax(z, t),
                                                                               oracle_softmax(s, t)))
                   for s, z, y in zip(student.tolist(), teacher.tolist(), labels.tolist())) / len(labels)
    got = reference_loss(student, teacher, labels, temperature=t, label_weight=lam)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_lambda_one_is_plain_cross_entropy(batch):
    student, teacher, labels = batch
    got = hinton_loss(student, teacher, labels, temperature=7.0, label_weight=1.0)
    assert torch.allclose(got, F.cross_entropy(student, labels))


def test_identical_logits_give_a_zero_soft_term(batch):
    student, _, labels = batch
    assert hinton_loss(student, student.clone(), labels, temperature=3.0, label_weight=0.0).item() == \
        pytest.approx(0.0, abs=1e-6)


def test_soft_term_gradient_scale_does_not_vanish_with_temperature(batch):
    """The T^2 factor keeps soft gradients comparable across temperatures (within ~2x here, not 25x)."""
    student, teacher, labels = batch
    norms = []
    for t in (2.0, 10.0):
        s = student.clone().requires_grad_()
        hinton_loss(s, teacher, labels, temperature=t, label_weight=0.0).backward()
        norms.append(s.grad.norm().item())
    assert 0.2 < norms[1] / norms[0] < 5


# ------------------------------------------------------------------------------------- the other loss forms

def oracle_pearson(a: list[float], b: list[float]) -> float:
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    return cov / math.sqrt(sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b))


def test_dist_matches_the_hand_written_formula(batch):
    student, teacher, labels = batch
    t, lam = 2.0, 0.25
    p_s = [oracle_softmax(z, t) for z in student.tolist()]
    p_t = [oracle_softmax(z, t) for z in teacher.tolist()]
    inter = 1 - sum(oracle_pearson(a, b) for a, b in zip(p_s, p_t)) / len(p_s)
    columns = list(zip(*p_s)), list(zip(*p_t))
    intra = 1 - sum(oracle_pearson(a, b) for a, b in zip(*columns)) / len(columns[0])
    ce = sum(oracle_ce(s, y) for s, y in zip(student.tolist(), labels.tolist())) / len(labels)
    got = dist_loss(student, teacher, labels, temperature=t, label_weight=lam)
    assert got.item() == pytest.approx(lam * ce + (1 - lam) * t * t * (inter + intra), rel=1e-5)


def test_dist_of_identical_logits_is_zero_and_the_batch_order_does_not_matter(batch):
    student, teacher, labels = batch
    assert dist_loss(student, student.clone(), labels, temperature=1.0, label_weight=0.0).item() == \
        pytest.approx(0.0, abs=1e-6)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    assert dist_loss(student[order], teacher[order], labels[order], temperature=3.0, label_weight=0.4).item() == \
        pytest.approx(dist_loss(student, teacher, labels, temperature=3.0, label_weight=0.4).item(), rel=1e-6)


def test_dkd_with_alpha_one_and_beta_the_teachers_non_target_mass_is_hintons_kl_per_image(batch):
    """Zhao et al.'s decomposition: KL = TCKD + (1 - p_t(y)) NCKD, image by image."""
    student, teacher, labels = batch
    t = 3.0
    tckd, nckd = dkd_parts(student, teacher, labels, t)
    p_teacher_target = F.softmax(teacher / t, dim=1).gather(1, labels[:, None]).squeeze(1)
    per_image_kl = torch.tensor([oracle_kl(oracle_softmax(z, t), oracle_softmax(s, t))
                                 for s, z in zip(student.tolist(), teacher.tolist())])
    assert torch.allclose(tckd + (1 - p_teacher_target) * nckd, per_image_kl, rtol=1e-5, atol=1e-6)


def test_dkd_matches_the_hand_written_formula(batch):
    student, teacher, labels = batch
    t, lam, alpha, beta, warm = 4.0, 0.2, 1.5, 8.0, 0.5
    expected = 0.0
    for s, z, y in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        p_s, p_t = oracle_softmax(s, t), oracle_softmax(z, t)
        tckd = oracle_kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        rest_s = [p for i, p in enumerate(p_s) if i != y]
        rest_t = [p for i, p in enumerate(p_t) if i != y]
        nckd = oracle_kl([p / sum(rest_t) for p in rest_t], [p / sum(rest_s) for p in rest_s])
        expected += lam * oracle_ce(s, y) + (1 - lam) * warm * t * t * (alpha * tckd + beta * nckd)
    got = dkd_loss(student, teacher, labels, temperature=t, label_weight=lam, alpha=alpha, beta=beta, warmup=warm)
    assert got.item() == pytest.approx(expected / len(labels), rel=1e-5)


def test_dkd_takes_the_teachers_top_class_where_labels_are_withheld_and_its_gradient_is_finite(batch):
    student, teacher, labels = batch
    withheld = torch.full_like(labels, UNLABELLED)
    s = student.clone().requires_grad_()
    got = dkd_loss(s, teacher, withheld, temperature=4.0, label_weight=0.0)
    got.backward()
    assert got.item() == pytest.approx(
        dkd_loss(student, teacher, teacher.argmax(dim=1), temperature=4.0, label_weight=0.0).item(), rel=1e-6)
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_lskd_ignores_any_per_image_affine_map_of_either_sides_logits(batch):
    student, teacher, labels = batch
    g = torch.Generator().manual_seed(1)
    scale, shift = torch.rand(6, 1, generator=g) * 5 + 0.1, torch.randn(6, 1, generator=g) * 10
    base = lskd_loss(student, teacher, labels, temperature=2.0, label_weight=0.0).item()
    assert base > 0.01
    assert lskd_loss(student * scale + shift, teacher, labels, temperature=2.0, label_weight=0.0).item() == \
        pytest.approx(base, rel=1e-4)
    assert lskd_loss(student, teacher * scale - shift, labels, temperature=2.0, label_weight=0.0).item() == \
        pytest.approx(base, rel=1e-4)
    # and is Hinton's loss on the z-scored logits
    z = [(m - m.mean(dim=1, keepdim=True)) / m.std(dim=1, keepdim=True) for m in (student, teacher)]
    assert base == pytest.approx(hinton_loss(*z, labels, temperature=2.0, label_weight=0.0).item(), rel=1e-4)


def test_mse_sums_over_classes_and_averages_over_images(batch):
    student, teacher, labels = batch
    squares = sum(sum((a - b) ** 2 for a, b in zip(s, z)) for s, z in zip(student.tolist(), teacher.tolist()))
    ce = sum(oracle_ce(s, y) for s, y in zip(student.tolist(), labels.tolist())) / len(labels)
    got = mse_loss(student, teacher, labels, temperature=9.0, label_weight=0.3)
    assert got.item() == pytest.approx(0.3 * ce + 0.7 * squares / len(labels), rel=1e-5)


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"reference"}))
def test_every_form_is_plain_cross_entropy_at_lambda_one(batch, name):
    student, teacher, labels = batch
    got = LOSSES[name](student, teacher, labels, temperature=3.0, label_weight=1.0)
    assert torch.allclose(got, F.cross_entropy(student, labels))


def test_dkds_kd_term_warms_up_linearly_over_the_first_twelfth_of_the_epochs(batch):
    from kdtune.student import Architecture, StudentConfig, initial
    student, teacher, labels = batch
    config = StudentConfig(4.0, 0.0, 8, "dkd", (("alpha", 1.0), ("beta", 8.0)))
    _, loss_fn = initial(config, Architecture("mlp", 1, (5,), 5), 0, max_epochs=36)  # 3 warm-up epochs
    full = dkd_loss(student, teacher, labels, temperature=4.0, label_weight=0.0)
    assert [loss_fn(student, teacher, labels, epoch).item() for epoch in (0, 1, 2, 10)] == pytest.approx(
        [full.item() / 3, 2 * full.item() / 3, full.item(), full.item()], rel=1e-6)
