"""Several MLP students trained as one model: the narrow students of a study, one batched step for all of them.

A narrow student's step is mostly per-operation dispatch, not arithmetic (width 64 ran at 18% of the fp32 matmul
peak on 2 cores): K students stacked into one model pay it once. Their first layers are one matmul, their other
layers one batched matmul each; each student keeps its own loss (temperature, lambda, loss form), and the loss
minimised is their sum, so each student's gradient is its own. Adam is elementwise, and kdtune's students share
the shuffling seed, so each student sees what `train.fit` would show it alone: the same initial weights, the
same batches, the same updates, equal within float rounding (the matmuls sum in another order).

Students of different widths are padded to the widest with zero units: a zero unit's output is ReLU(0) = 0 and
ReLU's gradient at 0 is 0, so no gradient ever reaches its weights and Adam leaves them at zero.

A student that stops (pruned, patient, diverged) leaves the batch: its parameters and Adam state are cut out,
and the others go on as before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.models import StudentMLP
from kdtune.spec import TrainSpec
from kdtune.train import EVAL_BATCH_SIZE, LR_SCHEDULES, FitResult, LossFn, StopTraining, TrainingDiverged


class StackedMLP(nn.Module):
    """K StudentMLPs of one depth as one module, (B, ...) -> (K, B, C); each parameter's first axis is the
    student. Built from the students' own initial weights."""

    def __init__(self, students: list[StudentMLP]):
        super().__init__()
        dense = [[layer for layer in student if isinstance(layer, nn.Linear)] for student in students]
        self.width = max(layers[0].out_features for layers in dense)
        n_layers = len(dense[0])
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([self._padded(layers[i].weight, i, n_layers) for layers in dense]))
            for i in range(n_layers))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([self._padded(layers[i].bias, i, n_layers) for layers in dense]))
            for i in range(n_layers))

    def _padded(self, tensor: torch.Tensor, index: int, n_layers: int) -> torch.Tensor:
        """A layer's weight (out, in) or bias (out,) with zero rows (hidden outputs) and zero columns (hidden
        inputs) up to the stack's width."""
        out_pad = self.width - tensor.shape[0] if index < n_layers - 1 else 0
        in_pad = self.width - tensor.shape[1] if tensor.dim() == 2 and index > 0 else 0
        padding = (0, in_pad, 0, out_pad) if tensor.dim() == 2 else (0, out_pad)
        return F.pad(tensor.detach(), padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weights[0].shape[0]
        first = F.linear(x.flatten(1), self.weights[0].flatten(0, 1), self.biases[0].flatten())
        hidden = torch.relu(first).view(len(x), k, self.width).transpose(0, 1)
        for weight, bias in zip(self.weights[1:-1], self.biases[1:-1]):
            hidden = torch.relu(torch.baddbmm(bias[:, None], hidden, weight.transpose(1, 2)))
        return torch.baddbmm(self.biases[-1][:, None], hidden, self.weights[-1].transpose(1, 2))

    def student_state(self, index: int, student: StudentMLP) -> dict[str, torch.Tensor]:
        """Student `index`'s weights, unpadded, as `student` (a model of its width) names them."""
        dense = [name for name, layer in student.named_children() if isinstance(layer, nn.Linear)]
        state = {}
        for i, name in enumerate(dense):
            layer = getattr(student, name)
            out_features, in_features = layer.weight.shape
            state[f"{name}.weight"] = self.weights[i][index, :out_features, :in_features].detach().clone()
            state[f"{name}.bias"] = self.biases[i][index, :out_features].detach().clone()
        return state


def keep_students(model: StackedMLP, optimizer: torch.optim.Adam, keep: list[int]) -> torch.optim.Adam:
    """Cut every student not in `keep` out of `model` and of Adam's state; returns the optimizer to go on with.
    A kept student's parameters and moments are copied exactly, so its next update is the one it would get."""
    index = torch.tensor(keep, device=model.weights[0].device)
    old_state = {name: optimizer.state[parameter] for name, parameter in model.named_parameters()}
    for parameters in (model.weights, model.biases):
        for i, parameter in enumerate(parameters):
            parameters[i] = nn.Parameter(parameter.detach()[index])
    kept = torch.optim.Adam(model.parameters(), **{key: value for key, value in optimizer.defaults.items()
                                                   if key in ("lr", "betas", "eps", "fused")})
    for name, parameter in model.named_parameters():
        state = old_state[name]
        kept.state[parameter] = {key: value if key == "step" else value[index] for key, value in state.items()}
    return kept


@dataclass
class Student:
    """One student of a batch: its model (built as it would be alone), its loss, its `report` callable, and
    `ended`, called with its outcome as it leaves the batch (the others train on)."""

    model: StudentMLP
    loss_fn: LossFn
    report: Callable[[int, float], None] | None = None
    ended: Callable[[Outcome], None] | None = None


@dataclass
class Outcome:
    """How one student of a batch ended: its result (as `train.fit` returns it), and the exception a fit alone
    would have raised, if any (TrainingDiverged); the model then holds no trained weights."""

    result: FitResult
    error: BaseException | None = None


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a batched fit; `interrupted`: the results so far of the students still in the
    batch, by their index in it (the others had ended, and `ended` had them)."""

    def __init__(self, interrupted: dict[int, Outcome]) -> None:
        super().__init__()
        self.interrupted = interrupted


def fit_together(students: list[Student], x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                 y_val: torch.Tensor, *, schedule: TrainSpec, seed: int, teacher_logits: torch.Tensor | None = None,
                 stop: Callable[[], bool] | None = None) -> list[Outcome]:
    """`train.fit` for every student at once, fp32, the schedule's learning rate, no augmentation (as kdtune
    trains students): each model ends holding its best epoch's weights, on the data's device, as `fit` leaves it, unless
    its outcome has an error. A student's `seconds` are its share of the batch's time: each epoch's time split
    evenly among the students it trained.

    `stop()`, polled after each epoch once the students that left are ended, interrupts the students still
    training (BatchInterrupted), as Ctrl-C does where nothing defers it."""
    device = x_train.device
    for student in students:
        student.model.to(device)
    model = StackedMLP([student.model for student in students]).to(device)
    # The fused kernel does Adam's whole update in one pass, as in `fit`.
    optimizer = torch.optim.Adam(model.parameters(), lr=schedule.learning_rate, fused=device.type in ("cpu", "cuda"))
    shuffle = torch.Generator(device="cpu").manual_seed(seed)  # as `fit` shuffles: the same batches for all
    outcomes = [Outcome(FitResult(0.0, 0, 0.0)) for _ in students]
    best = [(-1.0, 0, None)] * len(students)  # (accuracy, epoch, state) of each student's best epoch
    live = list(range(len(students)))  # the students still in the batch, by their index in `students`

    def end(i: int) -> None:
        if outcomes[i].error is None:
            students[i].model.load_state_dict(best[i][2])
            outcomes[i].result.val_accuracy = best[i][0]
        if students[i].ended is not None:
            students[i].ended(outcomes[i])

    try:
        for epoch in range(schedule.max_epochs):
            started = time.perf_counter()
            model.train()
            for group in optimizer.param_groups:  # as `fit` sets it; a rebuilt optimizer gets it too
                group["lr"] = schedule.learning_rate * LR_SCHEDULES[schedule.lr_schedule](epoch / schedule.max_epochs)
            order = torch.randperm(len(x_train), generator=shuffle).to(device)
            loss_sums = torch.zeros(len(live), device=device)
            for batch in order.split(schedule.batch_size):
                logits = model(x_train[batch])
                teacher = None if teacher_logits is None else teacher_logits[batch]
                losses = torch.stack([students[i].loss_fn(logits[k], teacher, y_train[batch], epoch)
                                      for k, i in enumerate(live)])
                optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()
                optimizer.step()
                loss_sums += losses.detach()
            accuracies = stacked_accuracies(model, x_val, y_val)
            finite = torch.isfinite(loss_sums).tolist()
            leaving = set()
            for k, i in enumerate(live):
                result = outcomes[i].result
                if not finite[k]:
                    outcomes[i].error = TrainingDiverged(
                        f"the training loss became {loss_sums[k].item()} in epoch {epoch + 1}", result)
                    leaving.add(i)
                    continue
                result.val_curve.append(accuracies[k])
                result.n_epochs = epoch + 1
                if accuracies[k] > best[i][0]:
                    best[i] = (accuracies[k], epoch, model.student_state(k, students[i].model))
                if stopped(students[i], epoch, accuracies[k], result) or epoch - best[i][1] >= schedule.patience_epochs:
                    leaving.add(i)
            share = (time.perf_counter() - started) / len(live)
            for i in live:
                outcomes[i].result.seconds += share
            if leaving:
                staying = [k for k, i in enumerate(live) if i not in leaving]
                live = [live[k] for k in staying]
                if live:
                    optimizer = keep_students(model, optimizer, staying)
                for i in sorted(leaving):
                    end(i)
                if not live:
                    break
            if stop is not None and stop():
                raise KeyboardInterrupt
        while live:  # those that trained every epoch
            end(live.pop(0))
    except KeyboardInterrupt:
        raise BatchInterrupted({i: outcomes[i] for i in live}) from None
    return outcomes


def stopped(student: Student, epoch: int, val_accuracy: float, result: FitResult) -> bool:
    """Whether the student's `report` (a pruner) stopped it after this epoch, as `fit` asks it."""
    if student.report is None:
        return False
    try:
        student.report(epoch, val_accuracy)
    except StopTraining as stop:
        result.stopped_early = str(stop)
        return True
    return False


@torch.inference_mode()
def stacked_accuracies(model: StackedMLP, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Each student's accuracy on (x, y), in large batches as `train.predict` takes them."""
    model.eval()
    correct = sum((model(chunk).argmax(dim=2) == labels).sum(dim=1)
                  for chunk, labels in zip(x.split(EVAL_BATCH_SIZE), y.split(EVAL_BATCH_SIZE)))
    return (correct.float() / len(y)).tolist()  # as `train.accuracy_of_logits` divides
