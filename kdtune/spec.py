"""The study spec: a frozen, typed dataclass tree read from TOML, plus a few CLI overrides.

Precedence, applied only in `load_spec`: dataclass defaults < the study TOML < CLI flags.
Unknown keys, wrong types and out-of-range values raise `SpecError` naming the TOML key.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from kdtune.losses import LOSSES

DEFAULT_SPEC = Path("studies/quickstart.toml")


class SpecError(ValueError):
    """Bad user input: the CLI prints it as one line and exits with code 2."""


@dataclass(frozen=True)
class Range:
    """A search range; `low == high` fixes the parameter to that value."""

    low: float
    high: float

    @property
    def fixed(self) -> bool:
        return self.low == self.high


# EMNIST stores each image column-major (transposed) in its .mat file and the Kaggle CSVs copy that; its IDX
# files are transposed too, but nothing in an IDX file tells them from MNIST's, so `idx` defaults to upright.
TRANSPOSED_FORMATS = ("emnist-mat", "emnist-csv")
DATA_FORMATS = ("embedded", "npz", "idx", "folder", "features", *TRANSPOSED_FORMATS)
LAYOUTS = ("auto", "nhwc", "nchw")


@dataclass(frozen=True)
class DataSpec:
    format: str = "embedded"  # embedded | npz | idx | folder | features | emnist-mat | emnist-csv
    # the file (npz, features, emnist-mat) or folder (idx, folder, emnist-csv), relative to the working directory
    path: str = ""
    # where an npz's colour images keep their channels: "nhwc" (N, H, W, C), "nchw" (N, C, H, W), or "auto": the
    # axis of length 1 or 3, refused when both are
    layout: str = "auto"
    # Transpose every image. Unset (None; TOML cannot write it) means the format's default, true for
    # TRANSPOSED_FORMATS; it is resolved on construction, so a study records the bool it used.
    transpose: bool | None = None
    label_offset: int = 0  # subtracted from every label: EMNIST-letters labels 1..26 need 1
    val_fraction: float = 0.1

    def __post_init__(self):
        if self.transpose is None:
            # a frozen dataclass can set a field in __post_init__ only through object.__setattr__
            object.__setattr__(self, "transpose", self.format in TRANSPOSED_FORMATS)


@dataclass(frozen=True)
class TrainSpec:
    """How one model is trained: Adam, shuffled mini-batches, early stopping on validation accuracy."""

    max_epochs: int = 15
    patience_epochs: int = 3  # stop after this many epochs without a new best validation accuracy
    batch_size: int = 128
    learning_rate: float = 1e-3
    # With "cosine", early stopping cuts the decay short: set patience_epochs = max_epochs to train it through.
    lr_schedule: str = "constant"  # constant | cosine (per epoch, from learning_rate to ~0 after max_epochs)


@dataclass(frozen=True)
class TeacherSpec(TrainSpec):
    # Teacher only: students learn the cached logits of fixed images, unshifted.
    augment: str = "none"  # none | shift (each training image moved up to 2 pixels each way; never flipped)
    # Where the teacher comes from (kdtune.teacher_sources): the built-in CNN, or "package.module:factory" called
    # with (input_shape, n_classes), trained here with the schedule above; `weights` (a state_dict file): that
    # model only evaluated, never trained; `logits` (an npz of `train` and `test` logits, aligned with the data's
    # files): no model at all.
    model: str = "builtin"
    weights: str = ""
    logits: str = ""


@dataclass(frozen=True)
class StudentSpec(TrainSpec):
    max_epochs: int = 20
    patience_epochs: int = 5
    # 256, not 128: measured 1.3x faster at width 1438 on 2 CPU cores, validation accuracy within seed noise.
    batch_size: int = 256
    # hinton | reference | dist | dkd | lskd | mse (kdtune/losses.py), or a list of them: the study then searches
    # the form, each with its own parameters ([search] for hinton and reference, [search.<loss>] for the others)
    loss: str | list = "hinton"
    # mlp | cnn (a small CNN whose channels scale with the width) | "package.module:factory", called with
    # (width, input_shape, n_classes) and returning an nn.Module (see kdtune.student)
    family: str = "mlp"
    depth: int = 1  # hidden layers of the mlp family, 1 to 3


@dataclass(frozen=True)
class WeightSearch:
    """The search range of a loss form's `lambda`, sampled on a log scale: the published weights of the newer
    forms sit near lambda = 0.01, which a uniform [0, 1] all but never samples."""

    label_weight: Range  # TOML key: "lambda"


@dataclass(frozen=True)
class TemperatureSearch(WeightSearch):
    temperature: Range  # sampled on a log scale


@dataclass(frozen=True)
class DKDSearch(TemperatureSearch):
    alpha: Range  # the weight of TCKD (target vs the rest), sampled on a log scale
    beta: Range  # the weight of NCKD (among the non-target classes), sampled on a log scale


@dataclass(frozen=True)
class SearchSpec:
    temperature: Range = Range(1.0, 20.0)  # sampled on a log scale
    label_weight: Range = Range(0.0, 1.0)  # TOML key and Optuna param: "lambda"
    width: Range = Range(16, 2048)  # hidden units, sampled on a log scale
    # size bands (kdtune.bands): "auto" (a 1-3-10 ladder of parameter counts up to the teacher's size), "none"
    # (one band: the whole width range), or the parameter counts to cut at, e.g. [50000, 200000]
    bands: str | list = "auto"
    pruner: str = "median"  # median | successive-halving | hyperband | none
    n_startup_trials: int = 5  # trials of a band that run to the end before the pruner judges others in it
    n_warmup_epochs: int = 2  # epochs of every trial that are never pruned
    control_arms: bool = True  # run the reference configuration and no-distillation students first
    # Each loss form's own ranges, from its paper's settings (lambda = the CE weight / the sum of both weights;
    # kdtune/losses.py cites each): DIST CE + 2 tau^2 (inter + intra), tau 1 to 4: lambda 1/3; DKD CE + 8 NCKD +
    # TCKD at T 4: lambda 0.5; logit-standardised KD 0.1 CE + 9 KD at base T 2: lambda 0.011; logit MSE best with
    # little or no CE.
    dist: TemperatureSearch = TemperatureSearch(Range(0.05, 0.9), Range(1.0, 8.0))
    dkd: DKDSearch = DKDSearch(Range(0.05, 0.9), Range(1.0, 8.0), Range(1.0, 1.0), Range(0.5, 16.0))
    lskd: TemperatureSearch = TemperatureSearch(Range(0.003, 0.5), Range(1.0, 8.0))
    mse: WeightSearch = WeightSearch(Range(0.003, 0.9))

    def ranges_of(self, loss: str) -> dict[str, tuple[Range, bool]]:
        """{user-facing name: (range, sampled on a log scale)} of the parameters the study samples for `loss`."""
        if loss not in EXTRA_SEARCHES:
            return {"temperature": (self.temperature, True), "lambda": (self.label_weight, False)}
        table = getattr(self, loss)
        return {TOML_KEYS.get(f.name, f.name): (getattr(table, f.name), True) for f in dataclasses.fields(table)}


@dataclass(frozen=True)
class TransferSpec:
    """What the students learn from (the teacher always learns from every training image with its label)."""

    labelled: float = 1.0  # a fraction (<= 1) or a count (> 1) of training images whose labels students see
    unlabelled: bool = False  # also train students on the other training images, teacher soft targets only


@dataclass(frozen=True)
class WorkersSpec:
    """Crash safety when workers share a study: a running trial sends a heartbeat every `heartbeat_seconds`; one
    silent for `grace_seconds` (its worker was killed) is failed and its configuration retried up to
    `max_retries` times."""

    heartbeat_seconds: int = 10
    grace_seconds: int = 60
    max_retries: int = 1


@dataclass(frozen=True)
class ReportSpec:
    n_seeds: int = 3
    n_candidates: int = 3  # top configurations of each size band retrained over seeds to pick the band's winner


@dataclass(frozen=True)
class Spec:
    name: str  # the study name; outputs go to studies/<name>/
    seed: int = 0
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 where the hardware has it natively, for large enough models)
    storage: str = ""  # Optuna storage URL; empty means sqlite:///studies/<name>/study.db
    artifacts: str = ""  # where the study's teacher travels: a folder or s3://bucket; empty: studies/<name>/artifacts
    # also time every trial's width in ONNX Runtime, as the student ships (kdtune[export]; ~0.7 s per new width)
    onnxruntime_latency: bool = False
    # narrow students (MLPs up to student.BATCH_MAX_WIDTH, fp32) train up to this many trials at once, each
    # still its own trial with its own result (kdtune.batched); 1 trains every trial alone. Off by default: it
    # pays only where trials run to the end (pruner = "none"), since trials training together cannot prune
    # each other (docs/performance.md)
    batch_students: int = 1
    data: DataSpec = field(default_factory=DataSpec)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    student: StudentSpec = field(default_factory=StudentSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    transfer: TransferSpec = field(default_factory=TransferSpec)
    workers: WorkersSpec = field(default_factory=WorkersSpec)
    report: ReportSpec = field(default_factory=ReportSpec)

    @property
    def output_dir(self) -> Path:
        return Path("studies") / self.name

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.output_dir / 'study.db'}"


# TOML names that differ from the Python field names (`lambda` is a Python keyword).
TOML_KEYS = {"label_weight": "lambda"}
# The loss forms with a [search.<loss>] table of their own; hinton and reference use [search] temperature, lambda.
EXTRA_SEARCHES = ("dist", "dkd", "lskd", "mse")
STUDENT_FAMILIES = ("mlp", "cnn")  # kdtune.student.FAMILIES
PRUNERS = ("median", "successive-halving", "hyperband", "none")
PRECISIONS = ("fp32", "bf16", "auto")
LR_SCHEDULES = ("constant", "cosine")
AUGMENTATIONS = ("none", "shift")
# Optuna's TPESampler takes seeds in [0, 2**32) and numpy's default_rng none below 0. kdtune adds offsets to the
# spec's seed (study.sampler_seed: the trials run, 1,000,003 per worker and up to that again for a process joining
# a running study; report: 1..n_seeds): seeds below 2**31 leave 2**31 for them, room for 2,000 workers.
MAX_SEED = 2**31 - 1
MAX_BATCH_STUDENTS = 64


def load_spec(path: Path | None = None, **overrides: object) -> Spec:
    """Read a spec TOML and apply CLI overrides (top-level fields such as storage, name, or report_n_seeds).

    Without a path: studies/quickstart.toml when it exists (a checkout), else the built-in defaults, which are
    the quickstart on the embedded data, so an installed `kdtune` works from any folder.
    """
    if path is None and not DEFAULT_SPEC.is_file():
        table: dict = {"name": DEFAULT_SPEC.stem}
    else:
        path = DEFAULT_SPEC if path is None else Path(path)
        if not path.is_file():
            raise SpecError(f"spec file {path} does not exist; pass --spec studies/<name>.toml.")
        try:
            table = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise SpecError(f"{path} is not valid TOML: {error}.") from error
        table.setdefault("name", path.stem)
    n_seeds = overrides.pop("report_n_seeds", None)
    table.update({k: v for k, v in overrides.items() if v is not None})
    if n_seeds is not None:
        table.setdefault("report", {})["n_seeds"] = n_seeds
    spec = _build(Spec, table, prefix="")
    validate(spec)
    return spec


def validate(spec: Spec) -> None:
    def check(ok: bool, message: str) -> None:
        if not ok:
            raise SpecError(message)

    check(spec.name.replace("-", "").replace("_", "").isalnum(), f"name must be letters, digits, - or _, "
          f"but got name={spec.name!r}.")
    check(0 <= spec.seed <= MAX_SEED, f"seed must lie in [0, {MAX_SEED}], but got seed={spec.seed}.")
    check(spec.device == "auto" or spec.device == "cpu" or spec.device.startswith("cuda"),
          f"device must be auto, cpu or cuda[:N], but got device={spec.device!r}.")
    choose(dict.fromkeys(PRECISIONS), spec.precision, "precision")
    check(1 <= spec.batch_students <= MAX_BATCH_STUDENTS, f"batch_students must lie in [1, {MAX_BATCH_STUDENTS}], "
          f"but got batch_students={spec.batch_students}.")
    check(0.0 < spec.data.val_fraction < 0.5, f"data.val_fraction must lie in (0, 0.5), "
          f"but got {spec.data.val_fraction=}.")
    choose(dict.fromkeys(DATA_FORMATS), spec.data.format, "data.format")
    choose(dict.fromkeys(LAYOUTS), spec.data.layout, "data.layout")
    if spec.data.format == "features":  # vectors: refused here, before a teacher is trained for nothing
        for ok, what in ((not spec.data.transpose, "data.transpose"),
                         (spec.teacher.augment == "none", "teacher.augment"),
                         (spec.teacher.model != "builtin" or spec.teacher.logits, "the built-in teacher CNN"),
                         (spec.student.family != "cnn", "student.family = \"cnn\"")):
            check(ok, f"{what} needs images, but data.format = \"features\" holds vectors; give [teacher] logits "
                  "or a model of your own, students of family \"mlp\" or your own, and no augmentation.")
    check(spec.data.format == "embedded" or spec.data.path != "", f"data.path is required for "
          f"data.format={spec.data.format!r}.")
    for section in ("teacher", "student"):
        part = getattr(spec, section)
        for name in ("max_epochs", "patience_epochs", "batch_size"):
            check(getattr(part, name) >= 1, f"{section}.{name} must be at least 1, but got {getattr(part, name)}.")
        check(part.learning_rate > 0, f"{section}.learning_rate must be positive, but got {part.learning_rate}.")
        choose(dict.fromkeys(LR_SCHEDULES), part.lr_schedule, f"{section}.lr_schedule")
    check(spec.teacher.model == "builtin" or ":" in spec.teacher.model, "teacher.model must be \"builtin\" or "
          f"\"package.module:factory\", but got {spec.teacher.model!r}.")
    check(not (spec.teacher.logits and (spec.teacher.weights or spec.teacher.model != "builtin")), "teacher.logits "
          "is the whole teacher: drop teacher.model and teacher.weights, or teacher.logits.")
    choose(dict.fromkeys(AUGMENTATIONS), spec.teacher.augment, "teacher.augment")
    losses = student_losses(spec.student)
    check(bool(losses) and all(isinstance(loss, str) for loss in losses) and len(set(losses)) == len(losses),
          "student.loss must be a loss name or a list of distinct "
          f"ones, but got {spec.student.loss!r}.")
    for loss in losses:
        choose(LOSSES, loss, "student.loss")
    check(":" in spec.student.family or spec.student.family in STUDENT_FAMILIES, "student.family must be one of "
          f"{list(STUDENT_FAMILIES)} or \"package.module:factory\", but got {spec.student.family!r}.")
    check(1 <= spec.student.depth <= 3 and (spec.student.depth == 1 or spec.student.family == "mlp"),
          f"student.depth must be 1, 2 or 3 hidden layers of the mlp family, but got depth = {spec.student.depth} "
          f"with family = {spec.student.family!r}.")
    choose(dict.fromkeys(PRUNERS), spec.search.pruner, "search.pruner")
    search = spec.search
    for name, low_limit, high_limit in (("temperature", 1e-3, 1e3), ("label_weight", 0.0, 1.0),
                                        ("width", 1, 1 << 16)):
        r = getattr(search, name)
        key = f"search.{TOML_KEYS.get(name, name)}"
        check(low_limit <= r.low <= r.high <= high_limit, f"{key} must satisfy {low_limit} <= low <= high <= "
              f"{high_limit}, but got [{r.low}, {r.high}].")
    for loss in set(losses) & set(EXTRA_SEARCHES):
        for name, (r, _) in search.ranges_of(loss).items():
            low_limit = 1e-3 if name != "lambda" else 1e-6
            high_limit = 1e3 if name != "lambda" else 1.0 - 1e-6  # log-scaled: 0 and 1 cannot be bounds
            check(low_limit <= r.low <= r.high <= high_limit, f"search.{loss}.{name} must satisfy {low_limit} <= low "
                  f"<= high <= {high_limit}, but got [{r.low}, {r.high}].")
    # suggest_int would silently truncate a fractional bound
    check(float(search.width.low).is_integer() and float(search.width.high).is_integer(), "search.width must be "
          f"whole numbers of hidden units, but got [{search.width.low}, {search.width.high}].")
    check(search.bands in ("auto", "none") or (
        isinstance(search.bands, list) and search.bands and all(type(b) is int and b > 0 for b in search.bands)
        and search.bands == sorted(set(search.bands))), "search.bands must be \"auto\", \"none\" or increasing "
        f"parameter counts to cut at, such as [50000, 200000], but got {search.bands!r}.")
    # Hyperband builds its brackets from the whole study (optuna.pruners.HyperbandPruner), so it cannot judge
    # a trial against its own size band only.
    check(search.pruner != "hyperband" or search.bands == "none" or search.width.fixed, "search.pruner = "
          "\"hyperband\" cannot judge each size band apart; use \"median\" or \"successive-halving\", or "
          "bands = \"none\".")
    check(search.n_startup_trials >= 0 and search.n_warmup_epochs >= 0,
          "search.n_startup_trials and search.n_warmup_epochs must not be negative.")
    check(spec.transfer.labelled > 0 and (spec.transfer.labelled <= 1 or spec.transfer.labelled.is_integer()),
          f"transfer.labelled must be a fraction in (0, 1] or a whole count, but got {spec.transfer.labelled}.")
    workers = spec.workers
    check(1 <= workers.heartbeat_seconds < workers.grace_seconds, "workers.heartbeat_seconds must be at least 1 and "
          f"less than workers.grace_seconds, but got {workers.heartbeat_seconds} and {workers.grace_seconds}.")
    check(workers.max_retries >= 0, f"workers.max_retries must not be negative, but got {workers.max_retries}.")
    check(spec.report.n_candidates >= 1, f"report.n_candidates must be at least 1, but got "
          f"{spec.report.n_candidates}.")
    check(spec.report.n_seeds >= 2, f"report.n_seeds must be at least 2 for an interval, but got "
          f"{spec.report.n_seeds}.")


def student_losses(student: StudentSpec) -> list[str]:
    """The loss forms a study's students train with: one, or the list the study searches."""
    return list(student.loss) if isinstance(student.loss, list) else [student.loss]


def choose(registry: dict, name: str, key: str):
    """registry[name], or a SpecError listing the names that exist."""
    if name not in registry:
        raise SpecError(f"{key} must be one of {sorted(registry)}, but got {name!r}.")
    return registry[name]


def to_toml_dict(spec: Spec) -> dict:
    """The resolved spec as plain data, with TOML key names, for the study record."""
    def convert(value):
        if isinstance(value, Range):
            return value.low if value.fixed else [value.low, value.high]
        if dataclasses.is_dataclass(value):
            return {TOML_KEYS.get(f.name, f.name): convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return value
    return convert(spec)


def _build(cls, table: object, prefix: str, base: object = None):
    """`cls` from a TOML table; `base`, a default instance of it, gives the keys the table leaves out (a loss
    form's [search.<loss>] table has defaults of its own, not of its class)."""
    if not isinstance(table, dict):
        raise SpecError(f"[{prefix.rstrip('.')}] must be a table, but got {table!r}.")
    fields = {TOML_KEYS.get(f.name, f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise SpecError(f"unknown key {prefix}{unknown[0]}; known keys here: {', '.join(sorted(fields))}.")
    hints = typing.get_type_hints(cls)
    values = {f.name: _coerce(hints[f.name], table[key], prefix + key, f.default)
              for key, f in fields.items() if key in table}
    if cls is Spec and "name" not in values:
        raise SpecError("the spec needs a name.")
    return cls(**values) if base is None else dataclasses.replace(base, **values)


def _coerce(hint, value, key: str, default: object = None):
    if dataclasses.is_dataclass(hint) and hint is not Range:
        return _build(hint, value, key + ".", default if dataclasses.is_dataclass(default) else None)
    if hint is Range:
        bounds = value if isinstance(value, list) else [value, value]
        if len(bounds) != 2 or not all(_is_number(b) for b in bounds):
            raise SpecError(f"{key} must be a number (fixed) or [low, high], but got {value!r}.")
        return Range(*bounds)
    expected = hint.__args__ if isinstance(hint, types.UnionType) else (hint,)
    if float in expected and _is_number(value):
        return float(value)
    if isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected):
        return value
    names = " or ".join(t.__name__ for t in expected if t is not types.NoneType)  # TOML has no null
    raise SpecError(f"{key} must be {names}, but got {value!r}.")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
