"""Settings: shipped defaults per trainer, RECOKD_CONFIG overrides, and errors a user can act on."""

import json
from importlib import resources

import pytest

from nnunetv2_recokd.config import (
    CONFIG_ENV,
    DistillSettings,
    SettingsError,
    default_settings,
    resolve_settings,
    settings_layers,
    shipped_config_names,
)
from nnunetv2_recokd.trainers import PUBLIC_TRAINERS

TRAINER = "nnUNetTrainerLogitKD"


def _override(tmp_path, values, name="override.json"):
    path = tmp_path / name
    path.write_text(json.dumps(values))
    return {CONFIG_ENV: str(path)}


def test_defaults_file_holds_every_setting():
    raw = json.loads((resources.files("nnunetv2_recokd.trainer_configs") / "defaults.json").read_text())
    assert sorted(raw) == sorted(DistillSettings.keys())


@pytest.mark.parametrize("trainer", PUBLIC_TRAINERS)
def test_each_trainer_file_holds_only_what_the_trainer_changes(trainer):
    """A reader sees what a variant changes: every key in its file differs from what its parent resolves to."""
    import nnunetv2_recokd.trainers as public

    settings = default_settings(trainer)
    assert isinstance(settings, DistillSettings)
    if trainer not in shipped_config_names():
        return
    cls = getattr(public, trainer)
    parent = default_settings(cls.__mro__[1]).as_dict()
    raw = json.loads((resources.files("nnunetv2_recokd.trainer_configs") / f"{trainer}.json").read_text())
    assert raw and set(raw) < set(DistillSettings.keys())
    for key, value in raw.items():
        assert parent[key] != value, f"{trainer}.json restates {key}={value!r} of its parent"
        assert getattr(settings, key) == value


def test_layers_apply_along_the_class_hierarchy():
    layers = [source for source, _ in settings_layers("nnUNetTrainerReCoKD_w8")]
    assert layers == ["trainer_configs/defaults.json", "trainer_configs/nnUNetTrainerReCoKD.json",
                      "trainer_configs/nnUNetTrainerReCoKD_w8.json"]
    s = default_settings("nnUNetTrainerReCoKD_w8")
    assert (s.reco_weight, s.student_width) == (0.01, 0.125)  # the parent's change and its own
    assert default_settings("nnUNetTrainerStudent").reco_weight == 0.0  # no file: the defaults
    assert default_settings("nnUNetTrainerReCoKDGraph").graph_weight == 0.1
    assert default_settings("nnUNetTrainerReCoKDGraph").reco_weight == 0.01


def test_shipped_widths_match_the_trainer_names():
    assert default_settings("nnUNetTrainerStudent").student_width == 0.25
    assert default_settings("nnUNetTrainerStudent_w2").student_width == 0.5
    assert default_settings("nnUNetTrainerStudent_w8").student_width == 0.125
    assert default_settings("nnUNetTrainerTeacher").student_width == 1.0
    assert default_settings("nnUNetTrainerLogitKD").student_width == 0.25


def test_no_override_gives_the_shipped_defaults():
    assert resolve_settings(TRAINER, environ={}) == default_settings(TRAINER)
    assert resolve_settings(TRAINER, environ={CONFIG_ENV: ""}) == default_settings(TRAINER)


def test_unknown_trainer_lists_shipped_trainers():
    with pytest.raises(SettingsError) as e:
        default_settings("nnUNetTrainerDoesNotExist")
    assert "nnUNetTrainerDoesNotExist" in str(e.value)
    assert "nnUNetTrainerLogitKD" in str(e.value)  # the message lists the shipped trainers


def test_override_replaces_only_the_given_keys(tmp_path):
    env = _override(tmp_path, {"num_epochs": 3, "teacher": "/some/teacher", "student_width": 0.5,
                               "logit_weight": 2, "reco_weight": 0.5})
    s = resolve_settings(TRAINER, environ=env)
    defaults = default_settings(TRAINER)
    assert s.num_epochs == 3
    assert s.teacher == "/some/teacher"
    assert s.student_width == 0.5
    assert s.logit_weight == 2.0 and isinstance(s.logit_weight, float)  # int accepted for float
    assert s.reco_weight == 0.5
    # everything else untouched
    changed = {k for k in DistillSettings.keys() if getattr(s, k) != getattr(defaults, k)}
    assert changed == {"num_epochs", "teacher", "student_width", "logit_weight", "reco_weight"}


def test_override_can_set_optional_back_to_none(tmp_path):
    env = _override(tmp_path, {"teacher": "/x"})
    assert resolve_settings(TRAINER, environ=env).teacher == "/x"
    env = _override(tmp_path, {"teacher": None, "reco_stages": [0, 1]}, "o2.json")
    s = resolve_settings(TRAINER, environ=env)
    assert s.teacher is None and s.reco_stages == [0, 1]


def test_several_teachers_folds_and_weights_are_settings(tmp_path):
    env = _override(tmp_path, {"teacher": ["/t/a", "/t/b"], "teacher_folds": "all", "teacher_weights": [1, 3]})
    s = resolve_settings(TRAINER, environ=env)
    assert s.teacher == ["/t/a", "/t/b"] and s.teacher_folds == "all"
    assert s.teacher_weights == [1.0, 3.0] and all(isinstance(w, float) for w in s.teacher_weights)
    s = resolve_settings(TRAINER, environ=_override(tmp_path, {"teacher_folds": [0, 2]}, "o3.json"))
    assert s.teacher_folds == [0, 2] and s.teacher is None
    with pytest.raises(SettingsError, match="empty list"):
        resolve_settings(TRAINER, environ=_override(tmp_path, {"teacher": []}, "o4.json"))


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    env = _override(tmp_path, {"num_epoch": 3})
    with pytest.raises(SettingsError) as e:
        resolve_settings(TRAINER, environ=env)
    msg = str(e.value)
    assert "num_epoch" in msg and "['num_epoch']" in msg
    for valid in ("num_epochs", "student_width", "logit_weight", "graph_gw_solver"):
        assert valid in msg
    assert str(tmp_path / "override.json") in msg


@pytest.mark.parametrize("key,value", [
    ("num_epochs", "3"),              # string for int
    ("num_epochs", 3.0),              # float for int
    ("num_epochs", True),             # bool for int
    ("logit_weight", True),           # bool for float
    ("logit_weight", "1.0"),          # string for float
    ("teacher", ["/a", 3]),           # a teacher list with a non-path
    ("teacher", 3),                   # neither a path nor a list of paths
    ("teacher_folds", "some"),        # only "all" is a word
    ("teacher_folds", [0, "1"]),      # folds are numbers
    ("teacher_weights", [1, "x"]),    # weights are numbers
    ("teacher_weights", [0, 0]),      # a zero sum
    ("seed", 1.5),                    # float for an optional int
    ("seed", True),                   # bool for an optional int
    ("teacher_trainer", 5),           # int for str
    ("graph_background_node", 1),     # int for bool
    ("reco_stages", 0),               # scalar for list
    ("reco_stages", [0, "1"]),        # wrong item type
    ("graph_stages", "dec0"),         # string for list[str]
    ("student_width", None),          # None for non-optional
])
def test_wrong_types_are_rejected_with_the_key_named(tmp_path, key, value):
    env = _override(tmp_path, {key: value})
    with pytest.raises(SettingsError) as e:
        resolve_settings(TRAINER, environ=env)
    assert key in str(e.value)


@pytest.mark.parametrize("key,value", [
    ("student_width", 0),
    ("student_width", 0.0),
    ("student_width", 1.5),
    ("student_width", -0.25),
    ("logit_weight", -1.0),
    ("reco_weight", -0.1),
    ("reco_warmup", 2),
    ("graph_warmup", -0.5),
    ("logit_warmup", 1.5),
    ("num_epochs", 0),
    ("logit_temperature", 0),
    ("graph_gw_solver", "sinkhorn"),
])
def test_out_of_range_values_are_rejected(tmp_path, key, value):
    env = _override(tmp_path, {key: value})
    with pytest.raises(SettingsError) as e:
        resolve_settings(TRAINER, environ=env)
    assert key in str(e.value)


def test_boundary_values_are_accepted(tmp_path):
    env = _override(tmp_path, {"student_width": 1, "reco_warmup": 0, "graph_warmup": 1, "logit_weight": 0})
    s = resolve_settings(TRAINER, environ=env)
    assert (s.student_width, s.reco_warmup, s.graph_warmup, s.logit_weight) == (1.0, 0.0, 1.0, 0.0)


def test_missing_override_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(SettingsError) as e:
        resolve_settings(TRAINER, environ={CONFIG_ENV: str(missing)})
    assert str(missing) in str(e.value)
    assert "does not exist" in str(e.value)


def test_unparseable_override_file_names_the_path(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{num_epochs: 3,,}")
    with pytest.raises(SettingsError) as e:
        resolve_settings(TRAINER, environ={CONFIG_ENV: str(bad)})
    assert str(bad) in str(e.value)


def test_override_must_be_a_json_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(SettingsError) as e:
        resolve_settings(TRAINER, environ={CONFIG_ENV: str(path)})
    assert str(path) in str(e.value)
    assert "list" in str(e.value)


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)
