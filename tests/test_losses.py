"""The losses against hand-written formulas (an independent oracle) and their identities."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdtune.losses import hinton_loss, reference_loss


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
