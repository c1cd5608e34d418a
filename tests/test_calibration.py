"""int8 calibration cases (deploy/quantize.py's calibration_cases and its callers): each fold is calibrated on its
own training cases (splits_final.json), never on a held-out case, and a student that reads fewer channels than its
dataset is fed the channels it reads, in its order.

The case selection is tested directly on tiny synthetic folders; the predictor and the export are run with the
tiles and the quantization replaced by recorders (NNCF is not needed and not run: tests/test_int8.py runs it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_recokd import sandbox
from nnunetv2_recokd.deploy import export, quantize
from nnunetv2_recokd.deploy.modelfolder import DeployError, open_model_folder
from nnunetv2_recokd.inputs.channels import student_dataset_json, student_plans

PATCH = (8, 8, 8)
STUDENT = "nnUNetTrainerReCoKD__nnUNetPlans__3d_fullres"
DATASET = sandbox.SANDBOX_DATASET
# two folds whose training cases differ (case_009 is in no image folder); held-out: each fold's "val"
SPLITS = [{"train": ["case_000", "case_002", "case_003", "case_005", "case_009"], "val": ["case_001", "case_004"]},
          {"train": ["case_001", "case_002", "case_004"], "val": ["case_000", "case_003", "case_005"]}]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _write_images(folder: Path, cases: int, channels: int, shape=PATCH, seed: int = 0) -> None:
    """<folder>/case_<i:03d>_<c:04d>.nii.gz: channel c of every case is noise around 10 * (c + 1) (never 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(cases):
        for c in range(channels):
            image = (10.0 * (c + 1) + rng.normal(0, 1 + c, shape)).astype(np.float32)
            sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / f"case_{i:03d}_{c:04d}.nii.gz"))


def _names(cases: list[list[str]]) -> list[list[str]]:
    return [[Path(f).name for f in files] for files in cases]


def _first_names(cases: list[list[str]]) -> list[str]:
    return [Path(files[0]).name[: -len("_0000.nii.gz")] for files in cases]


@pytest.fixture(scope="module")
def two_folds(tmp_path_factory):
    """(root, student folder): a two-fold random student of a one-channel dataset, the dataset's raw images
    (root/raw/<dataset>/imagesTr: case_000 .. case_005) and its splits (root/pre/<dataset>/splits_final.json)."""
    root = tmp_path_factory.mktemp("calibration")
    student = sandbox.write_random_student(root / "results" / DATASET / STUDENT, sandbox.unet_plans((4, 8), PATCH),
                                           sandbox.dataset_json(), folds=(0, 1))
    _write_images(root / "raw" / DATASET / "imagesTr", 6, 1)
    (root / "pre" / DATASET).mkdir(parents=True)
    (root / "pre" / DATASET / "splits_final.json").write_text(json.dumps(SPLITS))
    return root, student


@pytest.fixture
def dataset_env(two_folds, monkeypatch):
    root, _ = two_folds
    monkeypatch.setenv("nnUNet_raw", str(root / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "pre"))
    return root


# ------------------------------------------------------------------------------ (1) each fold: its own cases
def test_each_fold_is_calibrated_on_its_own_training_cases(two_folds, dataset_env):
    _, student = two_folds
    model = open_model_folder(student)
    assert model.folds == [0, 1]
    fold0 = quantize.calibration_cases(model, num_cases=8, fold=0)
    fold1 = quantize.calibration_cases(model, num_cases=8, fold=1)
    assert _first_names(fold0) == ["case_000", "case_002", "case_003", "case_005"]  # case_009: no image
    assert _first_names(fold1) == ["case_001", "case_002", "case_004"]
    assert _names(fold1) == [["case_001_0000.nii.gz"], ["case_002_0000.nii.gz"], ["case_004_0000.nii.gz"]]
    # evenly spaced over the fold's own cases; fold "all" (nnU-Net trains it on every case): every image
    assert _first_names(quantize.calibration_cases(model, num_cases=2, fold=0)) == ["case_000", "case_005"]
    assert _first_names(quantize.calibration_cases(model, num_cases=8, fold="all")) == [
        f"case_{i:03d}" for i in range(6)]
    # a named folder: the same cases for every fold
    named = dataset_env / "raw" / DATASET / "imagesTr"
    assert (quantize.calibration_cases(model, str(named), 3, fold=0)
            == quantize.calibration_cases(model, str(named), 3, fold=1))


def test_the_predictor_calibrates_each_fold_on_its_own_cases(two_folds, dataset_env, monkeypatch):
    """RuntimePredictor(precision int8): fold f's network gets the tiles of fold f's training cases (tiles and
    compilation replaced by recorders); folds sharing a --calibration folder share one computation of the tiles."""
    pytest.importorskip("openvino")
    import nnunetv2_recokd.deploy.predictor as predictor_module

    _, student = two_folds
    made = []

    def tiles(predictor, cases):
        made.append(_first_names(cases))
        return [_first_names(cases)]

    monkeypatch.setattr(predictor_module, "calibration_tiles", tiles)
    monkeypatch.setattr(predictor_module, "calibration_key", lambda cases: "-".join(_first_names(cases)))
    monkeypatch.setattr(predictor_module, "require_nncf", lambda: None)
    monkeypatch.setattr(predictor_module, "compile_network",
                        lambda *args, calibration=None, **kwargs: calibration())
    model = open_model_folder(student)
    predictor = predictor_module.build_predictor(model, "openvino", False, 0.5, use_cache=False, precision="int8")
    assert predictor.fold_networks == [[["case_000", "case_002", "case_003", "case_005"]],
                                       [["case_001", "case_002", "case_004"]]]
    made.clear()
    predictor = predictor_module.build_predictor(model, "openvino", False, 0.5, use_cache=False, precision="int8",
                                                 calibration=str(dataset_env / "raw" / DATASET / "imagesTr"),
                                                 calibration_cases=2)
    assert predictor.fold_networks == [[["case_000", "case_005"]]] * 2 and made == [["case_000", "case_005"]]


def test_export_quantizes_each_fold_on_its_own_cases(two_folds, dataset_env, tmp_path, monkeypatch):
    """write_int8_networks (export --precision int8): fold f's network is quantized on fold f's cases (tiles,
    quantization and writing replaced by recorders)."""
    _, student = two_folds
    quantized = {}
    monkeypatch.setattr(export, "require_nncf", lambda: None)
    monkeypatch.setattr(export, "calibration_tiles", lambda predictor, cases: _first_names(cases))
    monkeypatch.setattr(export, "quantize_onnx", lambda onnx_file, tiles: tiles)
    monkeypatch.setattr(export, "save_int8", lambda tiles, target: quantized.setdefault(target.parent.name, tiles))
    written = export.write_int8_networks(open_model_folder(student), tmp_path)
    assert [p.parent.name for p in written] == ["fold_0", "fold_1"]
    assert quantized == {"fold_0": ["case_000", "case_002", "case_003", "case_005"],
                         "fold_1": ["case_001", "case_002", "case_004"]}


# ---------------------------------------------------------------- (2) no training case found: an error, never val
def test_no_training_case_among_the_images_is_an_error_and_no_held_out_case_is_used(two_folds, dataset_env,
                                                                                   tmp_path, monkeypatch):
    _, student = two_folds
    model = open_model_folder(student)
    for fold, split in enumerate(SPLITS):  # with the whole list asked for, no held-out case is ever picked
        picked = set(_first_names(quantize.calibration_cases(model, num_cases=100, fold=fold)))
        assert picked and not picked & set(split["val"]) and picked <= set(split["train"])
    # fold 1's training cases are not among the images (only its held-out cases are): an error, not every image
    images = tmp_path / "raw" / DATASET / "imagesTr"
    images.mkdir(parents=True)
    for case in SPLITS[1]["val"]:
        (images / f"{case}_0000.nii.gz").write_bytes(b"")  # only the file names are read before the error
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    with pytest.raises(DeployError) as error:
        quantize.calibration_cases(model, fold=1)
    message = str(error.value)
    for said in ("fold 1", "splits_final.json", str(images), "case_001", "--calibration FOLDER", "nnUNet_raw",
                 "nnUNet_preprocessed", "held-out"):
        assert said in message, said
    # a numbered fold whose split is not found: its held-out cases cannot be told apart, so an error too
    monkeypatch.setenv("nnUNet_raw", str(dataset_env / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "no_splits"))
    with pytest.raises(DeployError, match=r"fold 0 .*splits_final.json is missing.*--calibration FOLDER"):
        quantize.calibration_cases(model, fold=0)
    monkeypatch.delenv("nnUNet_preprocessed")
    with pytest.raises(DeployError, match="nnUNet_preprocessed is not set.*--calibration FOLDER"):
        quantize.calibration_cases(model, fold=1)
    (tmp_path / "one_fold" / DATASET).mkdir(parents=True)
    (tmp_path / "one_fold" / DATASET / "splits_final.json").write_text(json.dumps(SPLITS[:1]))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "one_fold"))
    with pytest.raises(DeployError, match="has 1 fold\\(s\\), not fold 1"):
        quantize.calibration_cases(model, fold=1)


def test_the_predictor_stops_before_calibrating_on_held_out_cases(two_folds, dataset_env, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    import nnunetv2_recokd.deploy.predictor as predictor_module

    _, student = two_folds
    monkeypatch.setattr(predictor_module, "calibration_tiles", lambda *a: pytest.fail("calibrated anyway"))
    monkeypatch.setattr(predictor_module, "require_nncf", lambda: None)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "no_splits"))
    with pytest.raises(DeployError, match="fold 0"):
        predictor_module.build_predictor(open_model_folder(student), "openvino", False, 0.5, use_cache=False,
                                         precision="int8")


# ----------------------------------------------------------- (3) a student that reads fewer channels (2 of 3)
@pytest.fixture(scope="module")
def channel_student(tmp_path_factory):
    """(root, student folder, channels): a student that reads dataset channels [2, 0] (in this order) of a
    3-channel dataset, its model folder describing only those (as our trainers write it), the dataset's raw images
    (case_000 .. case_002, 3 channels each, PATCH-sized) and a split whose fold 0 trains on case_000 and case_002."""
    root = tmp_path_factory.mktemp("channels")
    channels = [2, 0]
    dataset = sandbox.dataset_json(channels=3)
    plans = sandbox.unet_plans((4, 8), PATCH)
    configuration = plans["configurations"]["3d_fullres"]
    configuration["normalization_schemes"] = ["ZScoreNormalization"] * 3
    configuration["use_mask_for_norm"] = [False] * 3
    plans["foreground_intensity_properties_per_channel"] = {
        str(c): plans["foreground_intensity_properties_per_channel"]["0"] for c in range(3)}
    student = sandbox.write_random_student(root / "results" / DATASET / STUDENT, student_plans(plans, channels),
                                           student_dataset_json(dataset, channels), folds=(0,))
    _write_images(root / "raw" / DATASET / "imagesTr", 3, 3)
    (root / "pre" / DATASET).mkdir(parents=True)
    (root / "pre" / DATASET / "splits_final.json").write_text(json.dumps(
        [{"train": ["case_000", "case_002"], "val": ["case_001"]}]))
    return root, student, channels


def test_a_fewer_channel_student_is_calibrated_on_its_channels_in_its_order(channel_student, tmp_path,
                                                                            monkeypatch):
    from nnunetv2_recokd.deploy.predictor import RuntimePredictor

    root, student, channels = channel_student
    monkeypatch.setenv("nnUNet_raw", str(root / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "pre"))
    model = open_model_folder(student)
    assert list(model.dataset_json["channel_names"].values()) == ["x2", "x"]
    cases = quantize.calibration_cases(model, fold=0)
    assert _names(cases) == [["case_000_0002.nii.gz", "case_000_0000.nii.gz"],
                             ["case_002_0002.nii.gz", "case_002_0000.nii.gz"]]
    # a named folder in the dataset's layout: the same picking; in the student's numbering: taken as it is
    images = root / "raw" / DATASET / "imagesTr"
    assert quantize.calibration_cases(model, str(images), fold=0) == quantize.calibration_cases(
        model, str(images), fold="all")
    assert _names(quantize.calibration_cases(model, str(images), fold=0))[0] == ["case_000_0002.nii.gz",
                                                                                 "case_000_0000.nii.gz"]
    own = tmp_path / "own"
    own.mkdir()
    for i, c in enumerate(channels):
        (own / f"case_000_{i:04d}.nii.gz").symlink_to(images / f"case_000_{c:04d}.nii.gz")
    assert _names(quantize.calibration_cases(model, str(own), fold=0)) == [["case_000_0000.nii.gz",
                                                                            "case_000_0001.nii.gz"]]
    # the tiles the network is calibrated on: its 2 channels, dataset channels 2 then 0, z-scored as it reads them
    predictor = RuntimePredictor("torch")
    predictor.initialize_from_trained_model_folder(str(student), [0], model.checkpoint_name)
    assert predictor.num_input_channels() == 2
    tiles = quantize.calibration_tiles(predictor, cases)
    assert [t.shape for t in tiles] == [(1, 2, *PATCH)] * 2  # one tile per PATCH-sized case
    for tile, case in zip(tiles, _first_names(cases)):
        for i, dataset_channel in enumerate(channels):
            raw = sitk.GetArrayFromImage(sitk.ReadImage(str(images / f"{case}_{dataset_channel:04d}.nii.gz")))
            assert np.allclose(tile[0, i], (raw - raw.mean()) / raw.std(), atol=1e-3)
    # a training case without one of the channels the student reads: the error names it
    broken = tmp_path / "raw" / DATASET / "imagesTr"
    broken.mkdir(parents=True)
    for f in images.iterdir():
        if f.name != "case_002_0000.nii.gz":
            (broken / f.name).symlink_to(f)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    with pytest.raises(DeployError, match="missing in .*case_002_0000.nii.gz"):
        quantize.calibration_cases(model, fold=0)
