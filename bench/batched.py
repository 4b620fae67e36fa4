"""Would training several trials' students at once pay? Measure the best case, then bound the study-level gain.

Students of one width train as one model: their first layers concatenated into one wide matmul, their output
layers one batched matmul, each with its own temperature and lambda in its own loss term. Adam is elementwise,
so this is exactly K independent students on the same batches (kdtune's trials share the shuffling seed).
The study-level bound is Amdahl's law over the time a real study spends in narrow trials.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from kdtune.losses import hinton_loss
from kdtune.models import StudentMLP
from kdtune.spec import StudentSpec
from kdtune.train import fit

NARROW = 256  # widths up to this leave a 2-core CPU idle between small matmuls


class BatchedStudents(nn.Module):
    def __init__(self, students: list[StudentMLP]):
        super().__init__()
        first = [s[1] for s in students]
        second = [s[3] for s in students]
        self.k, self.width = len(students), first[0].out_features
        self.first = nn.Linear(first[0].in_features, self.k * self.width)
        with torch.no_grad():  # start from the same weights K separate students would have
            self.first.weight.copy_(torch.cat([layer.weight for layer in first]))
            self.first.bias.copy_(torch.cat([layer.bias for layer in first]))
        self.second_weight = nn.Parameter(torch.stack([layer.weight.T for layer in second]).detach().clone())
        self.second_bias = nn.Parameter(torch.stack([layer.bias for layer in second]).detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (B, K, C)
        hidden = torch.relu(self.first(x.flatten(1))).view(len(x), self.k, self.width)
        return torch.einsum("bkh,khc->bkc", hidden, self.second_weight) + self.second_bias


def train_batched(students: list[StudentMLP], configs: list[tuple[float, float]], splits, soft, epochs: int,
                  seed: int) -> tuple[float, list[float]]:
    """(seconds, final validation accuracy of each student)."""
    started = time.perf_counter()
    model = BatchedStudents(students)
    schedule = StudentSpec()
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.learning_rate, fused=True)
    shuffle = torch.Generator().manual_seed(seed)
    x, y = splits.x_train, splits.y_train
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=shuffle).split(schedule.batch_size):
            logits = model(x[batch])
            loss = sum(hinton_loss(logits[:, k], soft[batch], y[batch], temperature=t, label_weight=lam)
                       for k, (t, lam) in enumerate(configs))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.inference_mode():
            val = (model(splits.x_val).argmax(dim=2) == splits.y_val[:, None]).float().mean(dim=0).tolist()
    return time.perf_counter() - started, val


def batched_speedup(splits, soft, epochs: int, trial_times: list[tuple[int, float]], k: int = 8,
                    width: int = 64) -> dict:
    """Time K students batched against the same K trained one after another; `trial_times` are (width,
    seconds) of a real study's trials, for the bound on a whole study."""
    configs = [(1.0 + 2.0 * i, 0.1 * i) for i in range(k)]

    def fresh_students() -> list[StudentMLP]:
        torch.manual_seed(0)
        return [StudentMLP(splits.input_shape, splits.n_classes, width) for _ in range(k)]

    train_batched(fresh_students(), configs, splits, soft, 1, 0)  # warm-up
    batched_seconds, batched_val = train_batched(fresh_students(), configs, splits, soft, epochs, 0)
    sequential_seconds, sequential_val = 0.0, []
    for student, (t, lam) in zip(fresh_students(), configs):
        result = fit(student, splits.x_train, splits.y_train, splits.x_val, splits.y_val, seed=0,
                     loss_fn=functools.partial(hinton_loss, temperature=t, label_weight=lam),
                     schedule=StudentSpec(max_epochs=epochs, patience_epochs=epochs), teacher_logits=soft)
        sequential_seconds += result.seconds
        sequential_val.append(result.val_curve[-1])
    speedup = sequential_seconds / batched_seconds
    row = {"students": k, "width": width, "epochs": epochs, "sequential_s": sequential_seconds,
           "batched_s": batched_seconds, "speedup": speedup,
           "max_val_difference": max(abs(a - b) for a, b in zip(batched_val, sequential_val))}
    if trial_times:
        narrow_share = sum(s for w, s in trial_times if w <= NARROW) / sum(s for _, s in trial_times)
        row.update({"study_time_share_narrow": narrow_share,
                    "study_speedup_bound": 1 / ((1 - narrow_share) + narrow_share / speedup)})
    return row
