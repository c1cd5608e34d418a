"""`nnunetv2_recokd predict` over many cases: an interrupted run resumed with --continue_prediction loses no case and
rewrites none, a damaged input file fails its own case only, an image in another format is refused up front.

The model is the deploy tests' tiny random student (patch 16^3, fold 0); the images are 20^3 synthetic volumes.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_recokd import sandbox
from nnunetv2_recokd.cli import main
from nnunetv2_recokd.deploy.integrity import CorruptInputError, check_image_file
from nnunetv2_recokd.deploy.modelfolder import open_model_folder
from nnunetv2_recokd.deploy.inputfolder import check_input_folder
from nnunetv2_recokd.deploy.predictor import STAGING, build_predictor, predict_cases
from nnunetv2_recokd.synthetic import make_case

STUDENT = "nnUNetTrainerReCoKD__nnUNetPlans__3d_fullres"

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(student model folder, a function writing n images into a folder); ONNX exports cached in a temporary
    folder, never in the user's ~/.cache."""
    root = tmp_path_factory.mktemp("robust")
    old = os.environ.get("RECOKD_CACHE")
    os.environ["RECOKD_CACHE"] = str(root / "cache")
    student = sandbox.write_random_student(root / STUDENT, sandbox.unet_plans((16, 32, 64), (16, 16, 16)),
                                           sandbox.dataset_json())

    def images(folder: Path, n: int) -> Path:
        folder.mkdir(parents=True)
        rng = np.random.default_rng(5)
        for i in range(n):
            image, _ = make_case(rng, 20, 0.15)
            sitk.WriteImage(sitk.GetImageFromArray(image), str(folder / f"case_{i:03d}_0000.nii.gz"))
        return folder
    yield student, images
    if old is None:
        del os.environ["RECOKD_CACHE"]
    else:
        os.environ["RECOKD_CACHE"] = old


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def _labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("case_*.nii.gz"))}


# ----------------------------------------------------------------------------------------------- interrupted runs
def test_kill_9_then_continue_prediction_loses_no_case_and_rewrites_none(world, tmp_path):
    """A real `kill -9` of the command once its first outputs are there, then the same command with
    --continue_prediction: every output that was there is complete and untouched (same mtime, dataset.json and
    plans.json included), the missing ones are predicted, and all equal an uninterrupted run's."""
    student, images = world
    inputs = images(tmp_path / "in", 12)
    out = tmp_path / "out"
    common = ["-i", str(inputs), "-m", str(student), "-f", "0", "--threads", "1", "--disable_tta"]
    assert main(["predict", *common, "-o", str(tmp_path / "reference")]) == 0  # also fills the ONNX cache
    reference = _labels(tmp_path / "reference")
    process = subprocess.Popen([sys.executable, "-m", "nnunetv2_recokd.cli", "predict", *common, "-o", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while len(list(out.glob("case_*.nii.gz"))) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, process.stderr.read()
    before = _mtimes(out)
    done = sorted(n for n in before if n.startswith("case_"))
    assert 2 <= len(done) < 12, "the run was not killed halfway"
    labels = _labels(out)
    for name in done:  # complete: readable and equal to the uninterrupted run's
        assert np.array_equal(labels[name], reference[name])
    assert main(["predict", *common, "-o", str(out), "--continue_prediction"]) == 0
    after = _mtimes(out)
    assert {n: after[n] for n in before} == before  # nothing rewritten
    assert sorted(_labels(out)) == sorted(reference) and not (out / STAGING).exists()
    for name, label in _labels(out).items():
        assert np.array_equal(label, reference[name])


class _Crash(BaseException):
    """Stands for the process dying (not an Exception: nothing catches it)."""


def test_crash_between_a_cases_files_with_probabilities_is_redone(world, tmp_path, monkeypatch):
    """--save_probabilities writes <case>.nii.gz, .npz and .pkl; a crash between moving them into place must not
    leave a case that --continue_prediction takes for done (nnUNetv2_predict counts a case as done when its
    segmentation and, with probabilities, its .npz exist). Simulated: the process dies at each of the three moves
    of the second case in turn."""
    student, images = world
    inputs = images(tmp_path / "in", 2)
    model = open_model_folder(student)
    predictor = build_predictor(model, "openvino", False, 0.5, threads=1)
    cases = check_input_folder(inputs, model.dataset_json)
    real_replace = os.replace
    for crash_at in range(3):
        out = tmp_path / f"out{crash_at}"
        moves = []

        def replace(source, target, *args, **kwargs):
            if Path(source).parent.name == STAGING and Path(source).name.startswith("case_001"):
                if len(moves) == crash_at:
                    raise _Crash()
                moves.append(Path(source).name)
            return real_replace(source, target, *args, **kwargs)
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(_Crash):
            predict_cases(predictor, cases, out, save_probabilities=True, log=lambda m: None)
        monkeypatch.setattr(os, "replace", real_replace)
        before = _mtimes(out)
        predict_cases(predictor, cases, out, save_probabilities=True, overwrite=False, log=lambda m: None)
        names = sorted(p.name for p in out.iterdir())
        assert names == ["case_000.nii.gz", "case_000.npz", "case_000.pkl", "case_001.nii.gz", "case_001.npz",
                         "case_001.pkl", "dataset.json", "plans.json"], (crash_at, names)
        after, complete = _mtimes(out), {n: t for n, t in before.items() if n.startswith("case_000")}
        assert {n: after[n] for n in complete} == complete  # the complete case: untouched
        if "case_001.nii.gz" in before:  # a case counted as done must be complete
            assert "case_001.npz" in before, (crash_at, sorted(before))


# ----------------------------------------------------------------------------------------------- bad inputs
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_damaged_file_fails_its_case_and_the_others_are_predicted(world, tmp_path, capsys):
    """A truncated .nii.gz (SimpleITK would read it as a whole image with zeros for what is missing) and a file
    that is no image fail their own cases; the others are written, the command exits 1 naming the failed cases, and
    a rerun with --continue_prediction after the files are replaced predicts only those."""
    student, images = world
    inputs = images(tmp_path / "in", 4)
    good = {n: (inputs / n).read_bytes() for n in ("case_001_0000.nii.gz", "case_002_0000.nii.gz")}
    _truncate(inputs / "case_001_0000.nii.gz")
    (inputs / "case_002_0000.nii.gz").write_bytes(gzip.compress(b"not an image" * 100))
    out = tmp_path / "out"
    common = ["-i", str(inputs), "-o", str(out), "-m", str(student), "-f", "0", "--disable_tta", "--threads", "1"]
    assert main(["predict", *common, "--timings", str(tmp_path / "t.json")]) == 1
    err = capsys.readouterr().err
    assert "2 case(s) could not be predicted" in err and "--continue_prediction" in err
    assert "case_001: " in err and "cut short" in err
    assert "case_002: reading: RuntimeError: " in err and "Unable to determine ImageIO reader" in err
    assert sorted(_labels(out)) == ["case_000.nii.gz", "case_003.nii.gz"] and not (out / STAGING).exists()
    timings = json.loads((tmp_path / "t.json").read_text())
    assert [c["case"] for c in timings["cases"]] == ["case_000", "case_003"]
    assert sorted(timings["failed"]) == ["case_001", "case_002"]
    before = _mtimes(out)
    for name, data in good.items():
        (inputs / name).write_bytes(data)
    assert main(["predict", *common, "--continue_prediction"]) == 0
    assert sorted(_labels(out)) == [f"case_{i:03d}.nii.gz" for i in range(4)]
    after = _mtimes(out)
    assert {n: after[n] for n in before} == before


def test_a_damaged_file_with_nnunet_workers(world, tmp_path, capsys):
    """-npp/-nps (nnU-Net's worker pipeline, which stops at a file it cannot read): damaged cases are left out
    before it starts, the others are predicted, the command exits 1 naming them."""
    student, images = world
    inputs = images(tmp_path / "in", 2)
    _truncate(inputs / "case_000_0000.nii.gz")
    out = tmp_path / "out"
    assert main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(student), "-f", "0", "--disable_tta",
                 "-npp", "1", "-nps", "1"]) == 1
    assert "case_000: " in capsys.readouterr().err
    assert sorted(_labels(out)) == ["case_001.nii.gz"]


def test_an_image_in_another_format_is_refused_before_any_work(world, tmp_path, capsys):
    """nnU-Net reads the files ending with dataset.json's file_ending and skips the rest without a word: a scan
    saved as .nii (or .mha, ...) next to .nii.gz files would be missing from the output. Refused up front, like a
    file without its _XXXX channel number; other files (notes, hidden files) are ignored as before."""
    student, images = world
    inputs = images(tmp_path / "in", 2)
    sitk.WriteImage(sitk.ReadImage(str(inputs / "case_001_0000.nii.gz")), str(inputs / "case_002_0000.nii"))
    (inputs / "notes.txt").write_text("scanner B")
    out = tmp_path / "out"
    args = ["predict", "-i", str(inputs), "-o", str(out), "-m", str(student), "-f", "0"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "case_002_0000.nii" in err and "do not end with .nii.gz" in err and "notes.txt" not in err
    assert not out.exists()
    (inputs / "case_002_0000.nii").unlink()
    (inputs / "scan.nii.gz").write_bytes((inputs / "case_000_0000.nii.gz").read_bytes())
    assert main(args) == 1
    assert "scan.nii.gz: not named <case>_XXXX.nii.gz" in capsys.readouterr().err
    assert not out.exists()


def test_integrity_check_of_nifti_files(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((6, 7, 8), np.float32))
    for name in ("a.nii.gz", "a.nii"):
        sitk.WriteImage(image, str(tmp_path / name))
        check_image_file(tmp_path / name)  # whole: passes
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[:-3])
        with pytest.raises(CorruptInputError, match="cut short"):
            check_image_file(tmp_path / name)
    (tmp_path / "b.nii.gz").write_bytes(b"plain bytes")
    with pytest.raises(CorruptInputError, match="not a complete, valid gzip file"):
        check_image_file(tmp_path / "b.nii.gz")
    (tmp_path / "c.mha").write_bytes(b"left to its reader")
    check_image_file(tmp_path / "c.mha")
