"""Teacher: where it is found, what is rejected (with the path and the fix in the message), frozen once loaded."""

import copy
import json
from pathlib import Path

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_recokd.sandbox import unet_plans
from nnunetv2_recokd.teacher import (
    FrozenTeacher,
    TeacherError,
    check_compatible,
    load_teacher,
    locate_teacher,
    resolve_teacher,
)

CFG = "3d_fullres"
CKPT = "checkpoint_final.pth"
DATASET = "Dataset999_Tiny"
HIPPOCAMPUS = (Path(__file__).resolve().parents[2] / "shared" / "teachers" / "Dataset004_Hippocampus"
               / "nnUNetTrainer__nnUNetPlans__3d_fullres")  # ../shared beside the checkout (skipped if absent)


def tiny_plans(features=(8, 16, 32)) -> dict:
    return unet_plans(features, (16, 16, 16), dataset_name=DATASET)


def tiny_dataset() -> dict:
    return {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "lesion": 1, "organ": 2},
            "numTraining": 2, "file_ending": ".nii.gz"}


def tiny_network(plans: dict, dataset: dict):
    pm = PlansManager(plans)
    cm = pm.get_configuration(CFG)
    return nnUNetTrainer.build_network_architecture(pm, cm, len(dataset["channel_names"]),
                                                    len(dataset["labels"]), enable_deep_supervision=True)


def write_model_folder(root: Path, plans=None, dataset=None, weights=None, fold=0) -> Path:
    """An nnU-Net model folder as nnUNetv2_train leaves it: plans.json, dataset.json, fold_X/checkpoint."""
    plans = plans or tiny_plans()
    dataset = dataset or tiny_dataset()
    root.mkdir(parents=True, exist_ok=True)
    (root / "plans.json").write_text(json.dumps(plans))
    (root / "dataset.json").write_text(json.dumps(dataset))
    (root / f"fold_{fold}").mkdir(exist_ok=True)
    if weights is None:
        torch.manual_seed(0)
        weights = tiny_network(plans, dataset).state_dict()
    torch.save({"network_weights": weights, "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": CFG}}, root / f"fold_{fold}" / CKPT)
    return root


@pytest.fixture
def model_folder(tmp_path) -> Path:
    return write_model_folder(tmp_path / "teacher_model")


def resolve(setting=None, environ=None, fold=0):
    return resolve_teacher(setting, DATASET, CFG, fold, "nnUNetTrainer", "nnUNetPlans", CKPT,
                           environ={} if environ is None else environ)


# ----------------------------------------------------------------------------------------------- finding
def test_accepted_forms_all_point_at_the_same_checkpoint(model_folder):
    ckpt = model_folder / "fold_0" / CKPT
    for form in (model_folder, model_folder / "fold_0", ckpt):
        loc = locate_teacher(str(form), "test", 0, CKPT)
        assert loc.checkpoint == ckpt
        assert loc.model_folder == model_folder


def test_model_folder_form_uses_the_fold(tmp_path):
    folder = write_model_folder(tmp_path / "m", fold=3)
    assert resolve(str(folder), fold=3).checkpoint == folder / "fold_3" / CKPT
    with pytest.raises(TeacherError) as e:
        resolve(str(folder), fold=0)
    assert str(folder / "fold_0" / CKPT) in str(e.value)


def test_priority_env_then_setting_then_nnunet_results(tmp_path):
    env_teacher = write_model_folder(tmp_path / "env_teacher")
    setting_teacher = write_model_folder(tmp_path / "setting_teacher")
    results = tmp_path / "results"
    default_teacher = write_model_folder(results / DATASET / f"nnUNetTrainer__nnUNetPlans__{CFG}")

    everything = {"RECOKD_TEACHER": str(env_teacher), "nnUNet_results": str(results)}
    loc = resolve(str(setting_teacher), everything)
    assert loc.model_folder == env_teacher and "RECOKD_TEACHER" in loc.source

    loc = resolve(str(setting_teacher), {"nnUNet_results": str(results)})
    assert loc.model_folder == setting_teacher and "setting" in loc.source

    loc = resolve(None, {"nnUNet_results": str(results), "RECOKD_TEACHER": ""})
    assert loc.model_folder == default_teacher and "default" in loc.source
    assert loc.checkpoint == default_teacher / "fold_0" / CKPT


def test_missing_teacher_names_the_path_and_the_env_var(tmp_path):
    results = tmp_path / "results"
    with pytest.raises(TeacherError) as e:
        resolve(None, {"nnUNet_results": str(results)})
    msg = str(e.value)
    assert str(results / DATASET / f"nnUNetTrainer__nnUNetPlans__{CFG}" / "fold_0" / CKPT) in msg
    assert "RECOKD_TEACHER" in msg

    missing = tmp_path / "no_such_teacher"
    with pytest.raises(TeacherError) as e:
        resolve(None, {"RECOKD_TEACHER": str(missing)})
    assert str(missing) in str(e.value) and "RECOKD_TEACHER" in str(e.value)


def test_no_nnunet_results_and_no_teacher_says_what_to_set():
    with pytest.raises(TeacherError) as e:
        resolve(None, {})
    assert "nnUNet_results" in str(e.value) and "RECOKD_TEACHER" in str(e.value)


def test_checkpoint_without_model_folder_files_is_rejected(tmp_path):
    folder = write_model_folder(tmp_path / "m")
    (folder / "dataset.json").unlink()
    with pytest.raises(TeacherError) as e:
        resolve(str(folder))
    assert "dataset.json" in str(e.value) and str(folder) in str(e.value)


# ----------------------------------------------------------------------------------------------- loading
def test_load_teacher_is_frozen(model_folder):
    teacher = load_teacher(resolve(str(model_folder)), tiny_plans(), tiny_dataset(), CFG, torch.device("cpu"))
    assert isinstance(teacher.network, FrozenTeacher)
    assert teacher.configuration == CFG and teacher.trainer_name == "nnUNetTrainer"
    params = list(teacher.network.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert not teacher.network.training and not teacher.network.network.training
    teacher.network.train()
    assert not teacher.network.training
    assert not any(m.training for m in teacher.network.modules())
    x = torch.randn(1, 1, 16, 16, 16, requires_grad=True)
    out = teacher.network(x)
    assert isinstance(out, (list, tuple)) and out[0].shape == (1, 3, 16, 16, 16)  # deep supervision on
    assert all(o.grad_fn is None and not o.requires_grad for o in out)
    assert teacher.arch_kwargs["features_per_stage"] == [8, 16, 32]
    assert str(model_folder / "fold_0" / CKPT) in teacher.describe()


def test_loaded_weights_are_the_checkpoint_weights(model_folder):
    saved = torch.load(model_folder / "fold_0" / CKPT, weights_only=False)["network_weights"]
    teacher = load_teacher(resolve(str(model_folder)), tiny_plans(), tiny_dataset(), CFG, torch.device("cpu"))
    loaded = teacher.network.network.state_dict()
    assert loaded.keys() == saved.keys()
    for k in saved:
        torch.testing.assert_close(loaded[k], saved[k], rtol=0, atol=0)


def test_ddp_prefixed_weights_are_accepted(tmp_path):
    torch.manual_seed(0)
    weights = {"module." + k: v for k, v in tiny_network(tiny_plans(), tiny_dataset()).state_dict().items()}
    folder = write_model_folder(tmp_path / "m", weights=weights)
    load_teacher(resolve(str(folder)), tiny_plans(), tiny_dataset(), CFG, torch.device("cpu"))


def test_unreadable_checkpoint(model_folder):
    ckpt = model_folder / "fold_0" / CKPT
    ckpt.write_bytes(b"\x00garbage, not a torch file" * 10)
    with pytest.raises(TeacherError) as e:
        load_teacher(resolve(str(model_folder)), tiny_plans(), tiny_dataset(), CFG, torch.device("cpu"))
    assert str(ckpt) in str(e.value) and "unreadable" in str(e.value)


def test_checkpoint_without_network_weights(model_folder):
    ckpt = model_folder / "fold_0" / CKPT
    torch.save({"trainer_name": "nnUNetTrainer", "state_dict": {}}, ckpt)
    with pytest.raises(TeacherError) as e:
        load_teacher(resolve(str(model_folder)), tiny_plans(), tiny_dataset(), CFG, torch.device("cpu"))
    assert "network_weights" in str(e.value) and str(ckpt) in str(e.value)


def test_weights_not_matching_the_plans(tmp_path):
    torch.manual_seed(0)
    wider = tiny_network(tiny_plans((16, 32, 64)), tiny_dataset()).state_dict()
    folder = write_model_folder(tmp_path / "m", weights=wider)  # plans say (8, 16, 32)
    with pytest.raises(TeacherError) as e:
        load_teacher(resolve(str(folder)), tiny_plans(), tiny_dataset(), CFG, torch.device("cpu"))
    assert "does not fit" in str(e.value) and str(folder / "plans.json") in str(e.value)


def test_teacher_configuration_missing_from_its_plans(tmp_path):
    folder = write_model_folder(tmp_path / "m")
    torch.save({"network_weights": {}, "trainer_name": "nnUNetTrainer", "init_args": {"configuration": "2d"}},
               folder / "fold_0" / CKPT)
    with pytest.raises(TeacherError, match="'2d'"):
        load_teacher(resolve(str(folder)), tiny_plans(), tiny_dataset(), CFG, torch.device("cpu"))


def test_incompatible_teacher_is_rejected_by_load_teacher(tmp_path):
    plans = tiny_plans()
    plans["configurations"][CFG]["spacing"] = [2.0, 1.0, 1.0]
    folder = write_model_folder(tmp_path / "m", plans=plans)
    with pytest.raises(TeacherError, match="spacing"):
        load_teacher(resolve(str(folder)), tiny_plans(), tiny_dataset(), CFG, torch.device("cpu"))


def test_wider_teacher_than_student_is_fine(tmp_path):
    """The teacher is rebuilt from its own plans: only the data must match, not the width."""
    folder = write_model_folder(tmp_path / "m", plans=tiny_plans((16, 32, 64)))
    teacher = load_teacher(resolve(str(folder)), tiny_plans(), tiny_dataset(), CFG, torch.device("cpu"))
    assert teacher.arch_kwargs["features_per_stage"] == [16, 32, 64]


# ------------------------------------------------------------------------------------------ compatibility
def _edit_plans(fn):
    plans = tiny_plans()
    fn(plans, plans["configurations"][CFG])
    return plans


def _edit_dataset(fn):
    dataset = tiny_dataset()
    fn(dataset)
    return dataset


DIFFERENCES = {
    "labels": (None, _edit_dataset(lambda d: d.__setitem__("labels", {"background": 0, "lesion": 1})), "labels"),
    "input channels": (None, _edit_dataset(lambda d: d.__setitem__("channel_names", {"0": "MRI", "1": "CT"})),
                       "CT"),
    "normalisation": (_edit_plans(lambda p, c: c.__setitem__("normalization_schemes", ["CTNormalization"])), None,
                      "CTNormalization"),
    "spacing": (_edit_plans(lambda p, c: c.__setitem__("spacing", [3.0, 1.0, 1.0])), None, "3.0"),
    "strides": (_edit_plans(lambda p, c: c["architecture"]["arch_kwargs"].__setitem__(
        "strides", [[1, 1, 1], [1, 2, 2], [2, 2, 2]])), None, "[1, 2, 2]"),
    "resampling_fn_data_kwargs": (_edit_plans(lambda p, c: c["resampling_fn_data_kwargs"].__setitem__(
        "force_separate_z", True)), None, "'force_separate_z': True"),
    "preprocessor": (_edit_plans(lambda p, c: c.__setitem__("preprocessor_name", "MyPreprocessor")), None,
                     "MyPreprocessor"),
}


@pytest.mark.parametrize("what", list(DIFFERENCES))
def test_check_compatible_names_each_difference(what):
    teacher_plans, teacher_dataset, value = DIFFERENCES[what]
    teacher_plans = teacher_plans or tiny_plans()
    teacher_dataset = teacher_dataset or tiny_dataset()
    with pytest.raises(TeacherError) as e:
        check_compatible(teacher_plans, teacher_dataset, CFG, tiny_plans(), tiny_dataset(), CFG)
    msg = str(e.value)
    assert what in msg and value in msg
    assert "RECOKD_TEACHER" in msg


def test_check_compatible_lists_all_differences_at_once():
    plans = _edit_plans(lambda p, c: (c.__setitem__("spacing", [3.0, 1.0, 1.0]),
                                      c.__setitem__("normalization_schemes", ["CTNormalization"])))
    dataset = _edit_dataset(lambda d: d.__setitem__("labels", {"background": 0, "x": 1}))
    with pytest.raises(TeacherError) as e:
        check_compatible(plans, dataset, CFG, tiny_plans(), tiny_dataset(), CFG)
    msg = str(e.value)
    assert "spacing" in msg and "normalisation" in msg and "labels" in msg
    assert "dataset:" not in msg and "strides" not in msg  # what matches is not listed


def test_check_compatible_accepts_same_data_and_ignores_width():
    check_compatible(tiny_plans((32, 64, 128)), tiny_dataset(), CFG, tiny_plans(), copy.deepcopy(tiny_dataset()),
                     CFG)


def test_check_compatible_accepts_the_same_preprocessing_under_another_data_identifier():
    """nnU-Net's ResEnc planners name their 3d_lowres data nnUNetResEncUNetMPlans_3d_lowres: the same preprocessing
    as nnUNetPlans_3d_lowres under another folder name, so a ResEnc teacher can teach a plain student."""
    teacher = _edit_plans(lambda p, c: (p.__setitem__("plans_name", "nnUNetResEncUNetMPlans"),
                                        c.__setitem__("data_identifier", "nnUNetResEncUNetMPlans_3d_fullres")))
    check_compatible(teacher, tiny_dataset(), CFG, tiny_plans(), tiny_dataset(), CFG)


# --------------------------------------------------------------------------------------- shipped teacher
@pytest.mark.skipif(not (HIPPOCAMPUS / "fold_0" / CKPT).is_file(), reason="shipped Hippocampus teacher missing")
def test_shipped_hippocampus_teacher_loads():
    plans = json.loads((HIPPOCAMPUS / "plans.json").read_text())
    dataset = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    loc = resolve_teacher(None, plans["dataset_name"], CFG, 0, "nnUNetTrainer", "nnUNetPlans", CKPT,
                          environ={"RECOKD_TEACHER": str(HIPPOCAMPUS)})
    teacher = load_teacher(loc, plans, dataset, CFG, torch.device("cpu"))
    n = sum(p.numel() for p in teacher.network.parameters())
    assert 5.5e6 < n < 5.7e6, n  # 5,603,177 for the 4-stage 32..256 PlainConvUNet
    assert teacher.arch_kwargs["features_per_stage"] == [32, 64, 128, 256]
    assert not any(p.requires_grad for p in teacher.network.parameters())
    out = teacher.network(torch.zeros(1, 1, 40, 56, 40))
    assert out[0].shape == (1, 3, 40, 56, 40)


def test_a_teacher_of_another_dataset_with_the_same_data_teaches(tmp_path):
    """A teacher trained elsewhere (or on the dataset a derived one came from): only the data must agree."""
    other = _edit_plans(lambda p, c: p.__setitem__("dataset_name", "Dataset123_Other"))
    check_compatible(other, tiny_dataset(), CFG, tiny_plans(), tiny_dataset(), CFG)
    folder = write_model_folder(tmp_path / "m", plans=other)
    teacher = load_teacher(resolve(str(folder)), tiny_plans(), tiny_dataset(), CFG, torch.device("cpu"))
    assert any("Dataset123_Other" in note for note in teacher.notes)
