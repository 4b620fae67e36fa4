"""Distillation losses: pure functions of (student logits, teacher logits, labels).

Every form is `lambda * CE(y, z_s) + (1 - lambda) * soft(z_s, z_t)`: `label_weight` is the user-facing
`lambda`, the weight of the hard-label cross-entropy, taken over the labelled images of the batch only; the soft
term covers every image. lambda = 1 is the student trained alone. The forms differ in their soft term only, and
in which extra parameters they take (`EXTRA_PARAMETERS`).
"""

import torch
import torch.nn.functional as F

# The label of a training image whose label is withheld from the student (see kdtune/transfer.py).
UNLABELLED = -1


def label_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled rows of the batch; 0 when none is labelled.

    Summed and divided on the device, not filtered by a boolean mask, to avoid a host sync per batch.
    """
    n_labelled = (labels != UNLABELLED).sum().clamp(min=1)
    return F.cross_entropy(logits, labels, ignore_index=UNLABELLED, reduction="sum") / n_labelled


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(z_t/T) || softmax(z_s/T)), batch mean."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1), reduction="batchmean", log_target=True)


def _combined(student_logits: torch.Tensor, labels: torch.Tensor, label_weight: float, soft) -> torch.Tensor:
    """lambda * CE + (1 - lambda) * soft(); the soft term is not computed at all for lambda = 1."""
    hard = label_cross_entropy(student_logits, labels)
    if label_weight == 1.0:
        return hard
    return label_weight * hard + (1.0 - label_weight) * soft()


def hinton_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                temperature: float, label_weight: float) -> torch.Tensor:
    """lambda * CE(y, z_s) + (1 - lambda) * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), batch-mean.

    The T^2 factor (Hinton et al. 2015, arXiv 1503.02531, section 2) keeps the soft term's gradients on the
    same scale as the label term whatever T is, so `lambda` means the same thing at T=2 and at T=20.
    KL uses reduction="batchmean": "mean" would also divide by the class count, silently shrinking the term.
    """
    return _combined(student_logits, labels, label_weight,
                     lambda: temperature**2 * soft_kl(student_logits, teacher_logits, temperature))


def reference_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                   temperature: float, label_weight: float) -> torch.Tensor:
    """lambda * CE(y, z_s) + CE(softmax(z_t/T), softmax(z_s/T)): the seed project's form, to reproduce it.

    No T^2 and no (1 - lambda): at T=10 its soft gradients are ~100x weaker than Hinton's, and lambda=1 still
    distils. Only use it to compare against the seed's numbers.
    """
    soft_targets = F.softmax(teacher_logits / temperature, dim=1)
    soft = -(soft_targets * F.log_softmax(student_logits / temperature, dim=1)).sum(dim=1).mean()
    return label_weight * label_cross_entropy(student_logits, labels) + soft


def pearson_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - the Pearson correlation of each row of `a` with the same row of `b`, averaged over rows."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return 1 - (F.cosine_similarity(a, b, dim=1, eps=1e-8)).mean()


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
              temperature: float, label_weight: float) -> torch.Tensor:
    """DIST (Huang et al. 2022, arXiv 2205.10536): lambda * CE + (1 - lambda) * tau^2 * (inter + intra), with
    p = softmax(z/tau) of each side, inter = 1 - mean Pearson correlation of each image's p across classes and
    intra = 1 - mean Pearson correlation of each class's p across the batch's images.

    Label-free and invariant to shifting or scaling either side's probabilities: the student matches the
    teacher's ranking of classes, not its exact probabilities. The paper's CIFAR setting, CE + 2 tau^2 (inter +
    intra), is lambda = 1/3 here (up to a factor of 3 on the learning rate). The intra term depends on which
    images share a batch, but not on their order in it.
    """
    def soft() -> torch.Tensor:
        p_s, p_t = F.softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1)
        return temperature**2 * (pearson_distance(p_s, p_t) + pearson_distance(p_s.T, p_t.T))
    return _combined(student_logits, labels, label_weight, soft)


def dkd_parts(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's two KL terms, per image (no T^2): TCKD, the KL of the binary (target, rest) distributions, and
    NCKD, the KL of the distributions over the non-target classes alone. KL(p_t || p_s) = TCKD + (1 -
    p_t(target)) * NCKD exactly, which is how DKD decouples Hinton's loss (Zhao et al. 2022, equation 7)."""
    target = F.one_hot(targets, student_logits.shape[1]).bool()

    def binary_log(logits: torch.Tensor) -> torch.Tensor:  # log of (p(target), 1 - p(target)), stably
        log_p = F.log_softmax(logits / temperature, dim=1)
        log_target = log_p.masked_fill(~target, float("-inf")).logsumexp(dim=1)
        return torch.stack([log_target, log_p.masked_fill(target, float("-inf")).logsumexp(dim=1)], dim=1)

    def non_target_log(logits: torch.Tensor) -> torch.Tensor:  # the target class set to -inf, renormalised
        return F.log_softmax((logits / temperature).masked_fill(target, float("-inf")), dim=1)

    def kl(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:  # KL(q || p), -inf entries contributing 0
        return torch.where(torch.isinf(log_q), 0.0, log_q.exp() * (log_q - log_p)).sum(dim=1)

    tckd = kl(binary_log(teacher_logits), binary_log(student_logits))
    nckd = kl(non_target_log(teacher_logits), non_target_log(student_logits))
    return tckd, nckd


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
             temperature: float, label_weight: float, alpha: float = 1.0, beta: float = 8.0,
             warmup: float = 1.0) -> torch.Tensor:
    """DKD (Zhao et al. 2022, arXiv 2203.08679): lambda * CE + (1 - lambda) * warmup * T^2 * (alpha * TCKD +
    beta * NCKD), batch mean (see `dkd_parts`). The paper's defaults: alpha = 1, beta = 8, T = 4, the KD term
    warmed up linearly over its first 20 of 240 epochs (`warmup`, the factor of this epoch, comes from the
    training loop: see kdtune.student).

    DKD needs each image's target class: an image whose label is withheld (UNLABELLED) takes the teacher's
    top class as its target; it still adds nothing to the CE term.
    """
    def soft() -> torch.Tensor:
        targets = torch.where(labels == UNLABELLED, teacher_logits.argmax(dim=1), labels)
        tckd, nckd = dkd_parts(student_logits, teacher_logits, targets, temperature)
        return warmup * temperature**2 * (alpha * tckd + beta * nckd).mean()
    return _combined(student_logits, labels, label_weight, soft)


def standardised(logits: torch.Tensor) -> torch.Tensor:
    """Each row z-scored: (z - mean(z)) / std(z), the unbiased std as the paper's code takes it."""
    return (logits - logits.mean(dim=1, keepdim=True)) / (1e-7 + logits.std(dim=1, keepdim=True))


def lskd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
              temperature: float, label_weight: float) -> torch.Tensor:
    """Logit-standardised KD (Sun et al. 2024, arXiv 2403.01427): Hinton's soft term on z-scored logits, T the
    base temperature: lambda * CE + (1 - lambda) * T^2 * KL(softmax(Z(z_t)/T) || softmax(Z(z_s)/T)).

    The student need not match the teacher's logit range, only its shape: the soft term is invariant to any
    per-image affine map a*z + b (a > 0) of either side. The paper's CIFAR weights (CE 0.1, KD 9, T 2) are
    lambda = 0.1 / 9.1 = 0.011 here, which is why its weight is searched on a log scale.
    """
    return _combined(student_logits, labels, label_weight,
                     lambda: temperature**2 * soft_kl(standardised(student_logits), standardised(teacher_logits),
                                                      temperature))


def mse_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
             temperature: float, label_weight: float) -> torch.Tensor:
    """Logit MSE (Kim et al. 2021, arXiv 2105.08919): lambda * CE + (1 - lambda) * sum over classes of (z_s -
    z_t)^2, mean over the batch. KL at T -> infinity, up to scale; no temperature (`temperature` is ignored).
    """
    return _combined(student_logits, labels, label_weight,
                     lambda: (student_logits - teacher_logits).pow(2).sum(dim=1).mean())


LOSSES = {"hinton": hinton_loss, "reference": reference_loss, "dist": dist_loss, "dkd": dkd_loss,
          "lskd": lskd_loss, "mse": mse_loss}
# The parameters a form takes beyond temperature and lambda (searched in the spec's [search.<loss>] table).
EXTRA_PARAMETERS = {"dkd": ("alpha", "beta")}
# Forms without a temperature: the study does not sample one for them.
WITHOUT_TEMPERATURE = ("mse",)
# DKD's warm-up, as a share of the training: the paper's 20 of 240 epochs.
DKD_WARMUP_SHARE = 20 / 240
