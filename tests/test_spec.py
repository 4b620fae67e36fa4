from pathlib import Path

import pytest

from kdtune.losses import EXTRA_PARAMETERS, WITHOUT_TEMPERATURE
from kdtune.spec import Range, SearchSpec, SpecError, load_spec, to_toml_dict


def write(tmp_path, text, name="s"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_defaults_and_name_from_the_file(tmp_path):
    spec = load_spec(write(tmp_path, "", name="mystudy"))
    assert spec.name == "mystudy"
    assert spec.search.temperature == Range(1.0, 20.0)
    assert spec.storage_url == "sqlite:///studies/mystudy/study.db"


def test_lambda_key_maps_to_label_weight_and_a_number_fixes_it(tmp_path):
    spec = load_spec(write(tmp_path, "[search]\nlambda = 0.7\nwidth = [32, 64]\n"))
    assert spec.search.label_weight.fixed and spec.search.label_weight.low == 0.7
    assert spec.search.width == Range(32, 64)
    assert to_toml_dict(spec)["search"]["lambda"] == 0.7


def test_cli_overrides_win_over_the_toml(tmp_path):
    spec = load_spec(write(tmp_path, 'storage = "sqlite:///a.db"\n[report]\nn_seeds = 4\n'),
                     storage="sqlite:///b.db", name="other", report_n_seeds=5)
    assert (spec.storage_url, spec.name, spec.report.n_seeds) == ("sqlite:///b.db", "other", 5)


@pytest.mark.parametrize("text, message", [
    ("[student]\nepochs = 3\n", "unknown key student.epochs"),
    ("[student]\nmax_epochs = '3'\n", "student.max_epochs must be int"),
    ("[search]\ntemperature = [5, 1]\n", "search.temperature must satisfy"),
    ("[search]\nlambda = [0, 2]\n", "search.lambda must satisfy"),
    ("[student]\nloss = 'kl'\n", "student.loss must be one of ['dist', 'dkd', 'hinton', 'lskd', 'mse', 'reference']"),
    ("[student]\nloss = ['dkd', 'kl']\n", "student.loss must be one of ['dist', "),
    ("[student]\nloss = ['dkd', 'dkd']\n", "student.loss must be a loss name or a list of distinct ones"),
    ("[student]\nloss = []\n", "student.loss must be a loss name or a list of distinct ones"),
    ("[student]\nloss = ['dkd', 3]\n", "student.loss must be a loss name or a list of distinct ones"),
    ("[student]\nloss = ['dkd']\n[search.dkd]\nlambda = [0, 0.5]\n", "search.dkd.lambda must satisfy 1e-06 <= low"),
    ("[student]\nloss = 'mse'\n[search.mse]\ntemperature = 2.0\n", "unknown key search.mse.temperature"),
    ("[student]\nloss = 'dist'\n[search.dist]\ntemperature = [0, 4]\n", "search.dist.temperature must satisfy"),
    ("[student]\nlr_schedule = 'step'\n", "student.lr_schedule must be one of ['constant', 'cosine']"),
    ("[search]\npruner = 'asha'\n", "search.pruner must be one of"),
    ("[data]\nval_fraction = 0.9\n", "data.val_fraction must lie in"),
    ("[data]\nformat = 'npz'\n", "data.path is required"),
    ("device = 'tpu'\n", "device must be auto, cpu or cuda"),
    ("precision = 'fp16'\n", "precision must be one of ['auto', 'bf16', 'fp32']"),
    ("[teacher]\nbatch_size = 0\n", "teacher.batch_size must be at least 1"),
    ("seed = true\n", "seed must be int"),
    ("data = 3\n", "[data] must be a table"),
    ("seed = -1\n", "seed must lie in [0, 2147483647], but got seed=-1."),
    (f"seed = {2**63 - 1}\n", f"seed must lie in [0, 2147483647], but got seed={2**63 - 1}."),
    ("[search]\nwidth = [16.5, 100]\n", "search.width must be whole numbers of hidden units, but got [16.5, 100]"),
    ("[search]\nwidth = 16.5\n", "search.width must be whole numbers"),
    ("[data]\nformat = 'csv'\npath = 'x'\n", "data.format must be one of ['embedded', 'emnist-csv', "),
    ("[data]\ntranspose = 'yes'\n", "data.transpose must be bool, but got 'yes'."),
    ("[teacher]\nlr_schedule = 'step'\n", "teacher.lr_schedule must be one of ['constant', 'cosine'], but got 'step'."),
    ("[teacher]\naugment = 'flip'\n", "teacher.augment must be one of ['none', 'shift'], but got 'flip'."),
    ("[teacher]\naugment = true\n", "teacher.augment must be str, but got True."),
    ("batch_students = 0\n", "batch_students must lie in [1, 64], but got batch_students=0."),
])
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_spec(write(tmp_path, text))


def test_the_largest_seed_leaves_room_for_the_offsets_kdtune_adds(tmp_path):
    import optuna
    import torch

    from kdtune.study import WORKER_SEED_STRIDE

    seed = load_spec(write(tmp_path, f"seed = {2**31 - 1}\n")).seed
    optuna.samplers.TPESampler(seed=seed + 100_000 + WORKER_SEED_STRIDE * 1001)  # trials, 1000 workers, a joiner
    torch.manual_seed(seed + 1 + 1000)  # report's fresh seeds


@pytest.mark.parametrize("data, transpose", [
    ("format = 'emnist-csv'\npath = 'x'\n", True),
    ("format = 'emnist-mat'\npath = 'x'\n", True),
    ("format = 'emnist-csv'\npath = 'x'\ntranspose = false\n", False),
    ("format = 'idx'\npath = 'x'\n", False),
    ("format = 'idx'\npath = 'x'\ntranspose = true\n", True),
    ("", False),
])
def test_transpose_defaults_by_format_and_the_record_holds_the_resolved_value(tmp_path, data, transpose):
    spec = load_spec(write(tmp_path, f"[data]\n{data}"))
    assert spec.data.transpose is transpose
    assert to_toml_dict(spec)["data"]["transpose"] is transpose


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.toml")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(write(tmp_path, "[search\n"))


def test_the_spec_is_frozen(tmp_path):
    spec = load_spec(write(tmp_path, ""))
    with pytest.raises(AttributeError):
        spec.seed = 3


def test_without_a_spec_file_the_built_in_quickstart_is_used(tmp_path, monkeypatch):
    """An installed kdtune run outside a checkout (no studies/quickstart.toml) still has a default."""
    monkeypatch.chdir(tmp_path)
    spec = load_spec()
    assert spec.name == "quickstart" and spec.data.format == "embedded"


def test_the_committed_quickstart_spec_equals_the_built_in_defaults(tmp_path, monkeypatch):
    committed = Path(__file__).resolve().parents[1] / "studies" / "quickstart.toml"
    monkeypatch.chdir(tmp_path)
    assert load_spec() == load_spec(committed)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.toml")),
                         ids=lambda path: path.name)
def test_every_committed_example_spec_is_valid(path):
    """The README points users at these: each must load, its user code names well formed."""
    spec = load_spec(path)
    assert spec.name == path.stem
    for reference in (spec.teacher.model, spec.student.family):
        assert reference in ("builtin", "mlp", "cnn") or reference.startswith("studies.user_models:")


def test_a_loss_forms_table_keeps_the_forms_own_defaults_for_the_keys_it_leaves_out(tmp_path):
    spec = load_spec(write(tmp_path, '[student]\nloss = ["hinton", "dkd"]\n[search.dkd]\nbeta = [1, 4]\n'))
    assert spec.student.loss == ["hinton", "dkd"]
    assert spec.search.dkd.beta == Range(1.0, 4.0)
    assert spec.search.dkd.temperature == SearchSpec().dkd.temperature == Range(1.0, 8.0)
    assert spec.search.ranges_of("dkd")["beta"] == (Range(1.0, 4.0), True)


@pytest.mark.parametrize("loss", ["hinton", "reference", "dist", "dkd", "lskd", "mse"])
def test_the_study_samples_exactly_the_parameters_each_loss_form_takes(loss):
    # The spec's [search.<loss>] table and the loss module name a form's extra parameters in two places: a field
    # added to one and not the other would be sampled and ignored, or read and never sampled.
    sampled = set(SearchSpec().ranges_of(loss))
    taken = {"lambda", *EXTRA_PARAMETERS.get(loss, ())} | (set() if loss in WITHOUT_TEMPERATURE else {"temperature"})
    assert sampled == taken
