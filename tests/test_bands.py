"""Size bands: how a study cuts its width range, shares its trials among bands, and judges each trial (sampler
and pruner) among the trials of its own band only."""

import math
import statistics
from collections import Counter
from dataclasses import replace

import optuna
import pytest

from kdtune import bands, study
from kdtune.models import TeacherCNN, n_parameters
from kdtune.per_band import PerBandPruner, PerBandSampler
from kdtune.spec import Range, SearchSpec, SpecError, load_spec, to_toml_dict
from kdtune.student import Architecture

FASHION = Architecture("mlp", 1, (1, 28, 28), 10)
FASHION_TEACHER = n_parameters(TeacherCNN((1, 28, 28), 10))
DIGITS = Architecture("mlp", 1, (1, 8, 8), 10)


def params(width: int) -> int:
    return FASHION.n_parameters(width)


def test_the_default_ladder_cuts_the_default_widths_into_five_contiguous_bands():
    cut = bands.size_bands(SearchSpec(), FASHION, FASHION_TEACHER)
    assert [(b.min_width, b.max_width) for b in cut] == [(16, 37), (38, 125), (126, 377), (378, 1257), (1258, 2048)]
    for band, upper_cut in zip(cut, (30_000, 100_000, 300_000, 1_000_000)):
        assert band.max_params == params(band.max_width) < upper_cut <= params(band.max_width + 1)
    assert [b.index for b in cut] == [0, 1, 2, 3, 4]
    assert cut[0].label == "12.7k-29.4k parameters" and cut[-1].label == "1M-1.63M parameters"


def test_students_larger_than_the_teacher_are_left_out():
    """The teacher has 3.36 M parameters at 28x28 with 10 classes: widths above ~4,230 would be larger."""
    cut = bands.size_bands(SearchSpec(width=Range(16, 8192)), FASHION, FASHION_TEACHER)
    assert params(cut[-1].max_width) <= FASHION_TEACHER < params(cut[-1].max_width + 1)
    one = bands.size_bands(SearchSpec(width=Range(16, 8192), bands="none"), FASHION, FASHION_TEACHER)
    assert [(b.min_width, b.max_width) for b in one] == [(16, 8192)]  # as before bands: the whole range


def test_a_teacher_of_unknown_size_leaves_the_whole_width_range_in():
    """A teacher given as logits has no parameter count: the ladder runs up to the widest student."""
    cut = bands.size_bands(SearchSpec(width=Range(16, 8192)), FASHION, None)
    assert cut[-1].max_width == 8192 and cut[-1].max_params == params(8192)


def test_bands_are_cut_on_the_parameter_counts_of_the_study_s_own_family():
    """A 2-layer MLP or a CNN has other counts at the same width: the bands follow the family's counts."""
    for architecture in (Architecture("mlp", 2, (1, 28, 28), 10), Architecture("cnn", 1, (3, 32, 32), 10)):
        cut = bands.size_bands(SearchSpec(width=Range(4, 512)), architecture, None)
        assert all(b.min_params == architecture.n_parameters(b.min_width) and
                   b.max_params == architecture.n_parameters(b.max_width) for b in cut)
        assert [b.max_params < 30_000 for b in cut[:1]] == [True] and len(cut) >= 3


def test_small_images_get_bands_below_ten_thousand_parameters():
    cut = bands.size_bands(SearchSpec(), DIGITS, n_parameters(TeacherCNN((1, 8, 8), 10)))
    assert [b.max_params < 3_000 for b in cut][:1] == [True] and len(cut) == 5


def test_cuts_given_in_the_spec_are_used_and_checked():
    cut = bands.size_bands(SearchSpec(bands=[50_000, 200_000]), FASHION, FASHION_TEACHER)
    assert [(b.max_params < 50_000, b.min_params >= 50_000) for b in cut[:2]] == [(True, False), (False, True)]
    assert len(cut) == 3
    with pytest.raises(SpecError, match="cuts at 5,000,000 parameters, outside"):
        bands.size_bands(SearchSpec(bands=[50_000, 5_000_000]), FASHION, FASHION_TEACHER)


@pytest.mark.parametrize("value, message", [
    ("'some'", "search.bands must be"), ("[200000, 50000]", "search.bands must be"), ("[0]", "search.bands must be"),
    ("[]", "search.bands must be")])
def test_bad_bands_are_refused(tiny_spec, value, message):
    with pytest.raises(SpecError, match=message):
        load_spec(tiny_spec(search=f"bands = {value}"))


def test_hyperband_is_refused_with_several_bands(tiny_spec):
    with pytest.raises(SpecError, match="hyperband.*cannot judge each size band apart"):
        load_spec(tiny_spec(pruner="hyperband"))
    load_spec(tiny_spec("one", pruner="hyperband", search='bands = "none"'))


def test_every_band_gets_an_equal_share_and_its_widths(tiny_spec):
    """Trials go to the band with the fewest trials; a queued trial keeps the band it was queued in."""
    spec = load_spec(tiny_spec(width="[8, 64]"))
    size_bands = bands.size_bands(spec.search, FASHION, FASHION_TEACHER)
    assert len(size_bands) == 3
    the_study = optuna.create_study(direction="maximize", sampler=study.make_sampler(0))
    the_study.enqueue_trial({"width": 60}, user_attrs={bands.TRIAL_KEY: 2})

    def objective(trial):
        config = study.suggest(trial, spec.search, "hinton", study.assign_band(trial, size_bands))
        return config.temperature

    the_study.optimize(objective, n_trials=9)
    in_band = Counter(bands.of_trial(t) for t in the_study.trials)
    assert in_band == {0: 3, 1: 3, 2: 3}
    assert the_study.trials[0].params["width"] == 60 and bands.of_trial(the_study.trials[0]) == 2
    assert all(size_bands[bands.of_trial(t)].holds(t.params["width"]) for t in the_study.trials)


def finished_trial(the_study, band: int, curve: list[float]) -> None:
    trial = the_study.ask()
    trial.set_user_attr(bands.TRIAL_KEY, band)
    for epoch, value in enumerate(curve):
        trial.report(value, epoch)
    the_study.tell(trial, max(curve))


def test_a_narrow_student_is_judged_only_against_its_own_band(tiny_spec):
    """The wide band is better at every epoch. A narrow trial above its band's median goes on, though it is far
    below every wide trial; a narrow trial below its band's median is pruned: pruning still works in a band."""
    spec = load_spec(tiny_spec(n_startup_trials=2))
    the_study = optuna.create_study(direction="maximize", pruner=study.make_pruner(spec))
    for _ in range(3):
        finished_trial(the_study, 1, [0.80, 0.85, 0.90, 0.91])
    finished_trial(the_study, 0, [0.50, 0.55, 0.60, 0.62])
    finished_trial(the_study, 0, [0.40, 0.45, 0.50, 0.52])
    finished_trial(the_study, 0, [0.45, 0.50, 0.55, 0.57])

    def pruned(band: int, value: float) -> bool:
        trial = the_study.ask()
        trial.set_user_attr(bands.TRIAL_KEY, band)
        trial.report(value, 0)
        return trial.should_prune()

    assert not pruned(0, 0.49)
    assert pruned(0, 0.30)
    assert pruned(1, 0.70)


class RecordingSampler(optuna.samplers.RandomSampler):
    """Notes which trials a sampler is shown, through both of the getters samplers use."""

    def __init__(self):
        super().__init__(seed=0)
        self.shown = []

    def sample_independent(self, study, trial, param_name, param_distribution):
        self.shown.append(({t.number for t in study.get_trials(deepcopy=False)},
                           {t.number for t in study._get_trials(deepcopy=False, use_cache=True)}))
        return super().sample_independent(study, trial, param_name, param_distribution)


def test_the_sampler_sees_only_the_trials_of_the_trial_s_band():
    recording = RecordingSampler()
    the_study = optuna.create_study(direction="maximize", sampler=PerBandSampler(recording))

    def objective(trial):
        trial.set_user_attr(bands.TRIAL_KEY, trial.number % 2)
        return trial.suggest_float("temperature", 1.0, 20.0)

    the_study.optimize(objective, n_trials=6)
    for number, (visible, visible_privately) in enumerate(recording.shown):
        same_band = {n for n in range(number + 1) if n % 2 == number % 2}
        assert visible == visible_privately == same_band


def test_a_study_made_before_bands_resumes_as_one_band(tiny_spec):
    """Its record (version 2) has no `bands`; it ran as one band. Resuming it asks for bands = "none"."""
    old = load_spec(tiny_spec(search='bands = "none"'))
    recorded = to_toml_dict(old)
    del recorded["search"]["bands"], recorded["search"]["control_arms"]  # keys the record predates
    study.check_same_spec(old, recorded, record_version=2)
    with pytest.raises(SpecError, match='made before size bands: add bands = "none"'):
        study.check_same_spec(replace(old, search=replace(old.search, bands="auto")), recorded, record_version=2)


def test_tpe_past_its_start_up_learns_each_band_from_its_own_trials():
    """Band 0 scores best near T = 2, band 1 near T = 15. Multivariate TPE (Optuna's default) through the
    per-band filter must learn each band's optimum from that band's trials alone, widths staying in-band."""
    size_bands = [bands.Band(0, 8, 40, 0, 0), bands.Band(1, 41, 512, 0, 0)]
    best_temperature = {0: 2.0, 1: 15.0}
    the_study = optuna.create_study(direction="maximize",
                                    sampler=PerBandSampler(optuna.samplers.TPESampler(seed=0, n_startup_trials=4)))

    def objective(trial):
        band = size_bands[trial.number % 2]
        trial.set_user_attr(bands.TRIAL_KEY, band.index)
        temperature = trial.suggest_float("temperature", 1.0, 20.0, log=True)
        trial.suggest_float("lambda", 0.0, 1.0)
        width = trial.suggest_int("width", band.min_width, band.max_width, log=True)
        assert band.holds(width)
        return -abs(math.log(temperature / best_temperature[band.index]))

    the_study.optimize(objective, n_trials=40)
    for band, target in best_temperature.items():
        late = [t.params["temperature"] for t in the_study.trials[-10:] if bands.of_trial(t) == band]
        assert abs(math.log(statistics.median(late) / target)) < math.log(2)  # within a factor of 2 of its own


def test_a_record_missing_a_section_still_refuses_a_changed_one(tiny_spec):
    """A section the record predates ran with its default: a spec that changes it is refused, not waved through."""
    old = load_spec(tiny_spec(search='bands = "none"'))
    recorded = to_toml_dict(old)
    del recorded["transfer"], recorded["precision"]
    study.check_same_spec(old, recorded, record_version=2)
    with pytest.raises(SpecError, match=r"different \[transfer\] section"):
        study.check_same_spec(replace(old, transfer=replace(old.transfer, labelled=0.1)), recorded, record_version=2)
    with pytest.raises(SpecError, match="different precision") as refused:
        study.check_same_spec(replace(old, precision="bf16"), recorded, record_version=2)
    assert "before size bands" not in str(refused.value)  # the hint only where bands are what changed


def test_a_study_of_one_band_gets_optuna_s_own_pruner(tiny_spec):
    """Optuna's samplers recognise Hyperband by its type (to sample within its brackets): a study of one band
    keeps it unwrapped; several bands wrap the pruner."""
    one_band = load_spec(tiny_spec(pruner="hyperband", search='bands = "none"'))
    assert isinstance(study.make_pruner(one_band), optuna.pruners.HyperbandPruner)
    assert isinstance(study.make_pruner(load_spec(tiny_spec("banded"))), PerBandPruner)
