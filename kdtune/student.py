"""The student: its configuration under the user-facing names, its families, its size, and how one is trained.

A new student family, loss or size objective is a change here: the study (an Optuna adapter) and the report
only ask for configurations, parameter counts and trained students.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from kdtune import batched, counting, models, user_code
from kdtune.hardware import Compute
from kdtune.losses import DKD_WARMUP_SHARE, EXTRA_PARAMETERS, LOSSES, WITHOUT_TEMPERATURE
from kdtune.spec import EXTRA_SEARCHES, SearchSpec, StudentSpec
from kdtune.train import FitResult, LossFn, every_epoch, fit
from kdtune.transfer import StudentData

# name -> builder(input_shape, n_classes, width, depth); a study's students are all of one family and depth. A
# family may also be user code, "package.module:factory", called as factory(width, input_shape, n_classes).
FAMILIES = {
    "mlp": models.StudentMLP,
    "cnn": lambda input_shape, n_classes, width, depth: models.StudentCNN(input_shape, n_classes, width),
}


@dataclass(frozen=True)
class StudentConfig:
    temperature: float
    label_weight: float  # the user-facing `lambda`, a Python keyword: named so in as_params/from_params only
    width: int
    loss: str = "hinton"
    # the loss form's own parameters (losses.EXTRA_PARAMETERS), as (name, value) pairs: DKD's alpha and beta
    extras: tuple[tuple[str, float], ...] = ()

    def as_params(self) -> dict:
        """The user-facing names, as in the spec and the report."""
        return {"temperature": self.temperature, "lambda": self.label_weight, "width": self.width, "loss": self.loss,
                **dict(self.extras)}

    @classmethod
    def from_params(cls, params: dict) -> StudentConfig:
        """The inverse of `as_params`."""
        loss = params["loss"]
        return cls(params["temperature"], params["lambda"], params["width"], loss,
                   tuple((name, params[name]) for name in EXTRA_PARAMETERS.get(loss, ())))

    @classmethod
    def from_trial(cls, trial) -> StudentConfig:
        """A study's trial (an Optuna FrozenTrial): its params under their Optuna names (`optuna_name`), and
        its loss, which is a user attribute (and a param too where the study searches it)."""
        loss = trial.user_attrs["loss"]
        names = ["lambda", *EXTRA_PARAMETERS.get(loss, ())] + ([] if loss in WITHOUT_TEMPERATURE else ["temperature"])
        return cls.from_params({"temperature": 1.0, "width": trial.params["width"], "loss": loss,
                                **{name: trial.params[optuna_name(loss, name)] for name in names}})

    @property
    def loss_label(self) -> str:
        """The loss form with its own parameters, for tables and notes: "dkd (alpha 1, beta 8)"."""
        extras = ", ".join(f"{name} {value:.3g}" for name, value in self.extras)
        return f"{self.loss} ({extras})" if extras else self.loss

    @property
    def distils(self) -> bool:
        """Whether the teacher's soft targets weigh in the loss form kdtune tunes (hinton); lambda = 1 is the
        student trained alone, on the labelled images only (see `train`)."""
        return self.label_weight < 1.0

    def within(self, search: SearchSpec) -> bool:
        """Whether the study's search space holds this configuration (the ranges of its own loss form)."""
        params = self.as_params()
        return search.width.low <= self.width <= search.width.high and all(
            r.low <= params[name] <= r.high for name, (r, _) in search.ranges_of(self.loss).items())


def optuna_name(loss: str, name: str) -> str:
    """The Optuna param of a user-facing parameter of a student of `loss`: hinton's and the reference's keep the
    names studies have always had; another form's are its own (`dkd_lambda`), since each form samples them from
    ranges of its own, on a log scale, and Optuna keeps one distribution per param name."""
    return f"{loss}_{name}" if loss in EXTRA_SEARCHES and name != "width" else name


# The seed project's configuration, its loss form included: every study runs it first and the report tests it.
REFERENCE = StudentConfig(temperature=10.0, label_weight=0.5, width=512, loss="reference")


def runs_reference(schedule: StudentSpec) -> bool:
    """Whether a study's students are of the reference's family, the seed project's one-layer MLP: only then
    do the study and the report run the reference (as a CNN of width 512 it would be another model)."""
    return schedule.family == "mlp" and schedule.depth == 1


@dataclass(frozen=True)
class Architecture:
    """What every student of a study is, whatever its width: one family at one depth, on one input shape."""

    family: str
    depth: int
    input_shape: tuple[int, ...]  # one model input: (C, H, W) or (D,)
    n_classes: int

    @classmethod
    def of(cls, schedule: StudentSpec, input_shape: tuple[int, ...], n_classes: int) -> Architecture:
        return cls(schedule.family, schedule.depth, tuple(input_shape), n_classes)

    def build(self, width: int) -> nn.Module:
        if user_code.is_reference(self.family):
            model = user_code.build(self.family, "student.family", width, self.input_shape, self.n_classes)
            user_code.check_output(model, self.input_shape, self.n_classes, self.family, "student.family")
            return model
        return FAMILIES[self.family](self.input_shape, self.n_classes, width, self.depth)

    def n_parameters(self, width: int) -> int:
        """Counted on the model itself, built on the meta device: no memory, no time, and the global RNG, which
        seeds the next student's weights, is left alone."""
        with torch.device("meta"):
            return models.n_parameters(self.build(width))

    def multiply_adds(self, width: int) -> int | None:
        """Per input, counted as `n_parameters` is, on the meta device; None for layers kdtune cannot count."""
        with torch.device("meta"):
            return counting.multiply_adds(self.build(width), self.input_shape)

    def compute_for(self, width: int, compute: Compute) -> Compute:
        """The device and precision the student of `width` trains and is evaluated in: `compute`, with `auto`
        resolved by the student's multiply-adds (see `hardware.Compute.for_student`)."""
        if not compute.by_student_size:
            return compute
        multiply_adds = self.multiply_adds(width)
        if multiply_adds is None:
            _warn_uncounted(self.family)
        return compute.for_student(multiply_adds)

    def as_record(self) -> dict:
        """What identifies the students, for records and caches; a user family's source too."""
        record = {"family": self.family, "depth": self.depth, "input_shape": list(self.input_shape),
                  "n_classes": self.n_classes}
        if user_code.is_reference(self.family):
            record["source_sha256"] = user_code.source_sha256(self.family, "student.family")
        return record

    @classmethod
    def from_record(cls, record: dict) -> Architecture:
        return cls(record["family"], record["depth"], tuple(record["input_shape"]), record["n_classes"])


@functools.cache
def _warn_uncounted(family: str) -> None:
    warnings.warn(f"precision = \"auto\": kdtune cannot count the multiply-adds of {family}'s students (a layer "
                  "other than dense, convolution or normalisation has weights), so they train in fp32; set "
                  "precision = \"bf16\" if they are large.", stacklevel=3)


def train(config: StudentConfig, architecture: Architecture, schedule: StudentSpec, data: StudentData, seed: int,
          compute: Compute, report: Callable[[int, float], None] | None = None) -> tuple[nn.Module, FitResult]:
    """One student on tensors already on the device; without distillation, on the labelled images only.

    `report(epoch, val_accuracy)` may raise `train.StopTraining` (a pruner's verdict): the student then comes
    back with its result so far, the reason in `result.stopped_early`. The precision is `compute`'s, resolved
    for this student (`Architecture.compute_for`; resolving it again changes nothing).
    """
    compute = architecture.compute_for(config.width, compute)
    model, loss_fn = initial(config, architecture, seed, schedule.max_epochs)
    data = training_data(config, data)
    result = fit(model, data.x_train, data.y_train, data.x_val, data.y_val, loss_fn=loss_fn, schedule=schedule,
                 seed=seed, teacher_logits=data.teacher_logits, report=report, autocast_dtype=compute.autocast_dtype,
                 lr_schedule=schedule.lr_schedule)
    return model, result


def initial(config: StudentConfig, architecture: Architecture, seed: int,
            max_epochs: int) -> tuple[nn.Module, LossFn]:
    """The student's initial weights, drawn from `seed` (every student of a width starts alike), and its loss,
    DKD's warmed up over the first DKD_WARMUP_SHARE of `max_epochs`."""
    torch.manual_seed(seed)
    model = architecture.build(config.width)
    form = functools.partial(LOSSES[config.loss], temperature=config.temperature, label_weight=config.label_weight,
                             **dict(config.extras))
    if config.loss != "dkd":
        return model, every_epoch(form)
    n_warmup_epochs = max(1, round(DKD_WARMUP_SHARE * max_epochs))
    return model, lambda logits, teacher_logits, labels, epoch: form(
        logits, teacher_logits, labels, warmup=min(1.0, (epoch + 1) / n_warmup_epochs))


def training_data(config: StudentConfig, data: StudentData) -> StudentData:
    """What the student learns from: without distillation, the labelled images only."""
    return data if config.distils else data.labelled_only()


# Students this wide or narrower train several at once (see `kdtune.batched`), up to `batch_students` together.
# Measured on 2 cores (bench/batched.py, docs/performance.md): batching pays most where a step is dispatch, not
# arithmetic, and less with every doubling of the width; 128 takes in the two narrowest bands of the default
# ladder on 28x28 images (up to 100,000 parameters), and a band whose widest students are wider is not batched.
BATCH_MAX_WIDTH = 128


def trains_together(architecture: Architecture, compute: Compute, width: int) -> bool:
    """Whether students of this width train batched: built-in MLPs (one stack holds them) in fp32 (bf16 would
    round the stacked matmuls differently from a student alone) up to BATCH_MAX_WIDTH."""
    return (architecture.family == "mlp" and width <= BATCH_MAX_WIDTH
            and architecture.compute_for(width, compute).autocast_dtype is None)


def batch_key(config: StudentConfig, architecture: Architecture, compute: Compute) -> tuple | None:
    """Students with equal keys can train in one batch (`train_together`); None: this one trains alone."""
    if not trains_together(architecture, compute, config.width):
        return None
    return (config.distils, architecture.compute_for(config.width, compute))


def train_together(configs: list[StudentConfig], architecture: Architecture, schedule: StudentSpec,
                   data: StudentData, seed: int, compute: Compute,
                   reports: list[Callable[[int, float], None] | None],
                   ended: list[Callable[[nn.Module, batched.Outcome], None]] | None = None,
                   stop: Callable[[], bool] | None = None) -> list[tuple[nn.Module, batched.Outcome]]:
    """`train` for students of one `batch_key`, in one batch: each comes back as it would alone (within float
    rounding), with its outcome; a student whose outcome has an error has no trained weights. `ended[i]` has
    student i's model and outcome as soon as it leaves the batch.

    Ctrl-C or SIGTERM, or `stop()` (polled after each epoch), raises `batched.BatchInterrupted` with the results
    so far of the students still training.
    """
    keys = {batch_key(config, architecture, compute) for config in configs}
    if len(keys) != 1 or None in keys:
        raise ValueError(f"students of batch keys {keys} cannot train in one batch")
    members = [batched.Student(*initial(config, architecture, seed, schedule.max_epochs), report)
               for config, report in zip(configs, reports)]
    for member, on_end in zip(members, ended or []):
        member.ended = functools.partial(on_end, member.model)
    data = training_data(configs[0], data)
    outcomes = batched.fit_together(members, data.x_train, data.y_train, data.x_val, data.y_val, schedule=schedule,
                                    seed=seed, teacher_logits=data.teacher_logits, stop=stop)
    return [(member.model, outcome) for member, outcome in zip(members, outcomes)]
