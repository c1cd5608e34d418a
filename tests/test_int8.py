"""int8 students (deploy/quantize.py): calibration on the user's cases, the cache, export, refusals.

Random-weight students on small synthetic images (as tests/test_deploy.py): a random U-Net's label map is noisy,
with every class present and small margins between logits, so it is the hardest case for int8's label agreement;
a trained student's margins are far larger (docs/benchmarks.md has the measured Dice on Hippocampus).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_recokd import sandbox
from nnunetv2_recokd.deploy import quantize
from nnunetv2_recokd.deploy.modelfolder import DeployError, open_model_folder
from nnunetv2_recokd.deploy.inputfolder import check_input_folder
from nnunetv2_recokd.deploy.predictor import build_predictor, predict_cases
from nnunetv2_recokd.deploy.runtime import compile_network
from nnunetv2_recokd.synthetic import make_case

pytest.importorskip("openvino")
pytest.importorskip("nncf")

PATCH = (16, 16, 16)
STUDENT = "nnUNetTrainerReCoKD__nnUNetPlans__3d_fullres"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A two-fold random student in results/Dataset991_Sandbox, a raw dataset of 4 training images beside it
    ($nnUNet_raw layout) and an input folder of 2 cases."""
    root = tmp_path_factory.mktemp("int8")
    plans, dataset = sandbox.unet_plans((16, 32, 64), PATCH), sandbox.dataset_json()
    student = sandbox.write_random_student(root / "results" / sandbox.SANDBOX_DATASET / STUDENT, plans, dataset,
                                           folds=(0, 1))
    rng = np.random.default_rng(5)
    for folder, n in (("raw/" + sandbox.SANDBOX_DATASET + "/imagesTr", 4), ("images", 2)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            image, _ = make_case(rng, 24, 0.15)
            sitk.WriteImage(sitk.GetImageFromArray(image), str(root / folder / f"case_{i:03d}_0000.nii.gz"))
    return root, student


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii.gz"))}


def test_calibration_cases_are_evenly_spaced_and_the_folds_training_cases(world, tmp_path, monkeypatch):
    """(tests/test_calibration.py tests the choice per fold, the refusals and a student's channels in detail.)"""
    root, student = world
    model = open_model_folder(student, [1])
    raw = root / "raw"
    monkeypatch.setenv("nnUNet_raw", str(raw))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    picked = quantize.calibration_cases(model, num_cases=2, fold="all")  # fold all: trained on every case
    assert [Path(c[0]).name for c in picked] == ["case_000_0000.nii.gz", "case_003_0000.nii.gz"]  # ends of 0..3
    # a numbered fold without the dataset's splits: its held-out cases are unknown, so no image is used
    with pytest.raises(DeployError, match="fold 1 .*nnUNet_preprocessed is not set"):
        quantize.calibration_cases(model, num_cases=8, fold=1)
    # with the dataset's splits: fold 1's training cases only (held-out cases stay held out)
    pre = tmp_path / "pre" / sandbox.SANDBOX_DATASET
    pre.mkdir(parents=True)
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["case_000"], "val": ["case_001", "case_002"]},
                                                       {"train": ["case_001", "case_002"], "val": ["case_000"]}]))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    picked = quantize.calibration_cases(model, num_cases=8, fold=1)
    assert [Path(c[0]).name for c in picked] == ["case_001_0000.nii.gz", "case_002_0000.nii.gz"]
    # a named folder wins; no folder and no raw dataset: the error says what to give
    assert len(quantize.calibration_cases(model, str(root / "images"), fold=1)) == 2
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "nowhere"))
    with pytest.raises(DeployError, match="--calibration FOLDER"):
        quantize.calibration_cases(model, fold=1)


def test_int8_prediction_is_calibrated_once_cached_and_agrees_with_f32(world, tmp_path, monkeypatch):
    """Two folds (mirroring off: 8x fewer forwards, the networks are the same), through nnU-Net's pipeline: most
    voxels keep their float32 label even on a random
    network; the second load reads the cached int8 networks (no calibration, no quantization)."""
    root, student = world
    model = open_model_folder(student)
    cases = check_input_folder(root / "images", model.dataset_json)
    calls = []
    tiles = quantize.calibration_tiles
    monkeypatch.setattr(quantize, "calibration_tiles", lambda *a, **k: (calls.append(1), tiles(*a, **k))[1])
    import nnunetv2_recokd.deploy.predictor as predictor_module
    monkeypatch.setattr(predictor_module, "calibration_tiles", quantize.calibration_tiles)
    cache = tmp_path / "cache"
    predictor = build_predictor(model, "openvino", False, 0.5, threads=1, cache_dir=cache, precision="int8",
                                calibration=str(root / "raw" / sandbox.SANDBOX_DATASET / "imagesTr"))
    assert len(predictor.fold_networks) == 2 and calls == [1]  # tiles made once, for both folds
    assert len(list((cache / "onnx").glob("*.int8-*.xml"))) == 2
    predict_cases(predictor, cases, tmp_path / "int8", log=lambda m: None)
    predict_cases(build_predictor(model, "torch", False, 0.5), cases, tmp_path / "f32", log=lambda m: None)
    int8, f32 = _labels(tmp_path / "int8"), _labels(tmp_path / "f32")
    assert sorted(int8) == ["case_000.nii.gz", "case_001.nii.gz"]
    for name in int8:
        assert set(np.unique(f32[name])) == {0, 1, 2}
        assert 0.8 < (int8[name] == f32[name]).mean() < 1.0  # close, and really quantized (not f32 in disguise)
    monkeypatch.setattr(quantize, "quantize_onnx", lambda *a: pytest.fail("the cached int8 network was not used"))
    again = build_predictor(model, "openvino", False, 0.5, threads=1, cache_dir=cache, precision="int8",
                            calibration=str(root / "raw" / sandbox.SANDBOX_DATASET / "imagesTr"))
    predict_cases(again, cases, tmp_path / "again", log=lambda m: None)
    assert calls == [1]
    for name, labels in _labels(tmp_path / "again").items():
        assert np.array_equal(labels, int8[name])


def test_export_writes_int8_networks_that_predict_uses_without_calibration(world, tmp_path, monkeypatch):
    from nnunetv2_recokd.cli import main

    root, student = world
    calibration = str(root / "raw" / sandbox.SANDBOX_DATASET / "imagesTr")
    assert main(["export", "-m", str(student), "-f", "0", "-o", str(tmp_path / "exported"), "--precision", "int8",
                 "--calibration", calibration]) == 0
    folder = next((tmp_path / "exported" / sandbox.SANDBOX_DATASET).iterdir())
    assert (folder / "fold_0" / "checkpoint_final.int8.xml").is_file()
    assert (folder / "fold_0" / "checkpoint_final.int8.bin").is_file()
    assert not list(folder.rglob("*.partial*"))
    # the exported folder needs no calibration images (none are found) and quantizes nothing
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "nowhere"))
    monkeypatch.setattr(quantize, "quantize_onnx", lambda *a: pytest.fail("the exported int8 network was not used"))
    args = ["predict", "-i", str(root / "images"), "--disable_tta", "--precision", "int8", "--no-cache",
            "--threads", "1"]
    assert main([*args, "-m", str(folder), "-o", str(tmp_path / "from_export")]) == 0
    exported = _labels(tmp_path / "from_export")
    assert sorted(exported) == ["case_000.nii.gz", "case_001.nii.gz"]
    # the student folder itself has no int8 network and no calibration images are found: the error says what to do
    code = main([*args, "-m", str(student), "-f", "0", "-o", str(tmp_path / "refused")])
    assert code == 1 and not (tmp_path / "refused").exists()


def test_int8_is_openvino_only_and_needs_nncf_and_calibration(monkeypatch):
    import importlib.util

    torch.manual_seed(0)
    from nnunetv2_recokd.deploy.export import build_stock_network

    network, _ = build_stock_network(sandbox.unet_plans((8, 16, 32), PATCH), sandbox.dataset_json(), "3d_fullres")
    with pytest.raises(DeployError, match="bf16 and int8 \\(openvino\\)"):
        compile_network(network, (1, 1, *PATCH), "onnxruntime", precision="int8")
    with pytest.raises(DeployError, match="calibration"):
        compile_network(network, (1, 1, *PATCH), "openvino", precision="int8")
    tiles = [np.zeros((1, 1, *PATCH), np.float32)]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else find_spec(name, *a))
    with pytest.raises(DeployError, match=r"nnunetv2-recokd\[deploy\]"):
        compile_network(network, (1, 1, *PATCH), "openvino", precision="int8", calibration=lambda: tiles)


def test_int8_cache_files_are_complete_or_absent(tmp_path, monkeypatch):
    """save_int8 renames the .bin then the .xml into place: a reader never sees an .xml without its weights, and a
    failed write leaves no target behind."""
    import openvino as ov

    from nnunetv2_recokd.deploy.export import build_stock_network
    from nnunetv2_recokd.deploy.runtime import export_onnx

    network, _ = build_stock_network(sandbox.unet_plans((8, 16, 32), PATCH), sandbox.dataset_json(), "3d_fullres")
    export_onnx(network, (1, 1, *PATCH), tmp_path / "n.onnx")
    model = ov.Core().read_model(str(tmp_path / "n.onnx"))
    target = tmp_path / "c" / "n.int8.xml"
    quantize.save_int8(model, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["n.int8.bin", "n.int8.xml"]

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(ov, "save_model", broken)
    other = tmp_path / "d" / "n.int8.xml"
    with pytest.raises(OSError):
        quantize.save_int8(model, other)
    assert not other.exists() and not other.with_suffix(".bin").exists()
    assert os.listdir(other.parent) == []
