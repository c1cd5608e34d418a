"""int8 post-training quantization of a fold's network for OpenVINO's CPU plugin (opt-in: ``--precision int8``).

NNCF's post-training quantization (``nncf.quantize``, the default PERFORMANCE preset: symmetric int8 weights and
activations) inserts quantize/dequantize pairs around the convolutions of the ONNX export; OpenVINO then runs those
convolutions with int8 kernels (VNNI/AMX where the CPU has them) and everything else (instance norm, nonlinearity,
the final 1x1 convolution's output) in float32.

Calibration: the activation ranges come from the sliding-window tiles of a few of the user's own cases, preprocessed
by the model's own nnU-Net preprocessor, exactly what the network sees at prediction. Each fold is calibrated on its
own cases (calibration_cases): ``--calibration FOLDER`` (images in nnU-Net's naming; the same cases for every fold),
else that fold's own training cases per ``$nnUNet_preprocessed/<dataset>/splits_final.json`` among the images of
the model's raw dataset (``$nnUNet_raw/<dataset>/imagesTr``; fold ``all``: every image). A fold's held-out cases are
never used: no split, or none of the fold's training cases among the images, is an error that says what to give. A
student that reads fewer channels than its dataset (``student_channels``) is fed the dataset channels it reads, in
its order (``recokd_student_channels`` of its dataset.json). The quantized network is cached beside the ONNX export
(keyed by the checkpoint, the calibration files and this module's settings); ``export --precision int8`` writes it
into the model folder (export.py's write_int8_networks), where ``predict --precision int8`` uses it without any
calibration images.

Judge int8 by Dice against ground truth on held-out cases (within 0.005 of float32 per class is this project's
bar) and by label agreement with float32: ``nnunetv2_recokd benchmark-predict --precisions f32 int8``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from nnunetv2_recokd.deploy.modelfolder import DeployError, Fold, ModelFolder

CALIBRATION_CASES = 8  # cases whose tiles calibrate the activation ranges
MAX_TILES = 64  # at most this many tiles (evenly spaced over all the cases' tiles): NNCF's statistics converge fast
INT8_SUFFIX = ".int8.xml"  # fold_<f>/<checkpoint stem>.int8.xml (+ .bin) written by export --precision int8
INSTALL_HINT = "pip install 'nnunetv2-recokd[deploy]'  (int8 needs NNCF)"
QUANTIZE_VERSION = 1  # bump when the quantization recipe changes: cached int8 networks are then rebuilt


def require_nncf() -> None:
    import importlib.util

    if importlib.util.find_spec("nncf") is None:
        raise DeployError(f"--precision int8 needs the Python package 'nncf', which is not installed: {INSTALL_HINT}")


def exported_int8(model: ModelFolder, fold) -> Optional[Path]:
    """The fold's int8 network written by ``export --precision int8``, if the model folder has it."""
    path = model.checkpoint_path(fold)
    candidate = path.with_name(path.name.rsplit(".", 1)[0] + INT8_SUFFIX)
    return candidate if candidate.is_file() and candidate.with_suffix(".bin").is_file() else None


def calibration_cases(model: ModelFolder, folder: Optional[str] = None, num_cases: int = CALIBRATION_CASES, *,
                      fold: Fold) -> list[list[str]]:
    """The channel files of the cases that calibrate int8 for one fold, evenly spaced over the candidates (sorted by
    name); each case's files are in the order the network reads its channels.

    Args:
        model: the model folder (its dataset.json says which channels the network reads).
        folder: images in nnU-Net's naming, numbered as the model's dataset.json (for a student that reads fewer
            channels, the dataset's layout is taken too: its channels are then picked). None: the images of the model's
            raw dataset, ``$nnUNet_raw/<dataset>/imagesTr``, of the fold's own training cases only (per
            ``$nnUNet_preprocessed/<dataset>/splits_final.json``; fold "all": every case), so that no held-out case
            of the fold calibrates it; a student that reads fewer channels gets the dataset channels it reads, in its
            order.
        num_cases: at most this many cases.
        fold: the fold whose network is calibrated.

    Returns:
        One list of C file paths per case (C: the channels of the model's dataset.json).

    Raises:
        DeployError: num_cases below 1; no folder given and the raw images, the dataset's splits, the fold in them or
            any of the fold's training cases among the images not found (never a fallback to held-out cases); a
            folder whose files do not match the model's channels.
    """
    from nnunetv2_recokd.deploy.inputfolder import check_input_folder
    from nnunetv2_recokd.inputs.channels import (
        DATASET_KEY,
        ChannelError,
        holds_dataset_layout,
        student_case_files,
    )

    if num_cases < 1:
        raise DeployError("--calibration_cases must be at least 1")
    student = DATASET_KEY in model.dataset_json  # a student that reads a subset of the dataset's channels
    try:
        if folder is None:
            raw = os.environ.get("nnUNet_raw")
            candidate = Path(raw) / model.dataset_name / "imagesTr" if raw else None
            if candidate is None or not candidate.is_dir():
                raise DeployError(
                    "--precision int8 calibrates the network on a few of your own cases: give a folder of training "
                    "images in nnU-Net's naming with --calibration FOLDER (or set nnUNet_raw so that "
                    f"{model.dataset_name}/imagesTr is found: "
                    f"{f'{candidate} does not exist' if candidate is not None else 'nnUNet_raw is not set'})")
            train = fold_training_cases(model, fold)
            # the raw dataset's images hold every channel of the dataset: a student's channels are picked from them
            cases = (student_case_files(candidate, model.dataset_json) if student
                     else check_input_folder(candidate, model.dataset_json))
            if train is not None:
                ending = model.dataset_json["file_ending"]
                kept = [c for c in cases if _case_name(c[0], ending) in train]
                if not kept:
                    raise DeployError(
                        f"int8 calibration of fold {fold} uses only that fold's own training cases ({len(train)} in "
                        f"{_splits_file(model)}: {_listing(sorted(train))}), and none of them is in {candidate} "
                        f"({len(cases)} case(s): {_listing([_case_name(c[0], ending) for c in cases])}); held-out "
                        "cases are never used. Point nnUNet_raw and nnUNet_preprocessed at the dataset this model was "
                        "trained on, or give a folder of its training images with --calibration FOLDER")
                cases = kept
        elif student and holds_dataset_layout(folder, model.dataset_json):
            cases = student_case_files(folder, model.dataset_json)
        else:
            cases = check_input_folder(folder, model.dataset_json)
    except ChannelError as e:
        raise DeployError(f"int8 calibration: {e}") from None
    picks = np.unique(np.linspace(0, len(cases) - 1, min(num_cases, len(cases))).round().astype(int))
    return [cases[i] for i in picks]


def _case_name(first_file: str, ending: str) -> str:
    return os.path.basename(first_file)[: -len(ending) - 5]


def _listing(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _splits_file(model: ModelFolder) -> Path:
    pre = os.environ.get("nnUNet_preprocessed") or "$nnUNet_preprocessed"
    return Path(pre) / model.dataset_name / "splits_final.json"


def fold_training_cases(model: ModelFolder, fold: Fold) -> Optional[set[str]]:
    """The training cases of the fold per ``$nnUNet_preprocessed/<dataset>/splits_final.json`` (nnU-Net's split,
    written when the model was trained); None for fold "all", which nnU-Net trains on every case.

    Raises:
        DeployError: a numbered fold whose split is not found (nnUNet_preprocessed not set, no splits_final.json, or
            the fold not in it): its held-out cases cannot be told apart, so none of the images is used.
    """
    if str(fold) == "all":
        return None
    if not str(fold).isdigit():
        raise DeployError(f"fold {fold!r} is neither a number nor 'all': its training cases are unknown; give a "
                          "folder of its training images with --calibration FOLDER")
    splits = _splits_file(model)
    remedy = (f"point nnUNet_preprocessed at the preprocessed data this model was trained from (nnU-Net writes "
              f"{model.dataset_name}/splits_final.json there), or give a folder of the fold's training images with "
              "--calibration FOLDER")
    if not os.environ.get("nnUNet_preprocessed") or not splits.is_file():
        where = f"{splits} is missing" if os.environ.get("nnUNet_preprocessed") else "nnUNet_preprocessed is not set"
        raise DeployError(f"int8 calibration of fold {fold} uses only that fold's own training cases, listed in "
                          f"nnU-Net's splits_final.json, but {where} (held-out cases are never used): {remedy}")
    folds = json.loads(splits.read_text())
    if int(fold) >= len(folds):
        raise DeployError(f"int8 calibration of fold {fold}: {splits} has {len(folds)} fold(s), not fold {fold} "
                          f"(held-out cases are never used): {remedy}")
    return set(folds[int(fold)]["train"])


def calibration_tiles(predictor, cases: Sequence[Sequence[str]], max_tiles: int = MAX_TILES) -> list[np.ndarray]:
    """Sliding-window tiles (1, C, *patch) of the cases, preprocessed and padded as nnU-Net's prediction does,
    at most max_tiles of them, evenly spaced. cases: C files per case (calibration_cases), the network's channels in
    its order."""
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    patch = tuple(predictor.configuration_manager.patch_size)
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    tiles = []
    for files in cases:
        data, _, _ = preprocessor.run_case(list(files), None, predictor.plans_manager,
                                           predictor.configuration_manager, predictor.dataset_json)
        data, _ = pad_nd_image(torch.from_numpy(data), patch, "constant", {"value": 0}, True, None)
        for slicer in predictor._internal_get_sliding_window_slicers(data.shape[1:]):
            tiles.append(np.ascontiguousarray(data[slicer][None].numpy(), dtype=np.float32))
    if len(tiles) > max_tiles:
        tiles = [tiles[i] for i in np.linspace(0, len(tiles) - 1, max_tiles).round().astype(int)]
    return tiles


def calibration_key(cases: Sequence[Sequence[str]], max_tiles: int = MAX_TILES) -> str:
    """Identifies a calibration set by its files (path, size, modification time) and the recipe."""
    import nncf

    parts = [f"v{QUANTIZE_VERSION}", f"nncf {nncf.__version__}", f"tiles {max_tiles}"]
    for files in cases:
        for f in files:
            stat = os.stat(f)
            parts.append(f"{os.path.abspath(f)}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def quantize_onnx(onnx_file: Path, tiles: Sequence[np.ndarray]):
    """The ONNX network as an OpenVINO model quantized to int8 with NNCF on the calibration tiles."""
    import logging

    import nncf
    import openvino as ov

    if not tiles:
        raise DeployError("no calibration tiles: the calibration cases produced no input")
    print(f"int8: quantizing the network on {len(tiles)} calibration tile(s) (NNCF; done once, then cached)",
          flush=True)
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.ERROR)  # its INFO lines and progress bars are noise in a prediction command
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return nncf.quantize(ov.Core().read_model(str(onnx_file)), nncf.Dataset(list(tiles)),
                                 subset_size=len(tiles), preset=nncf.QuantizationPreset.PERFORMANCE)
    finally:
        nncf_logger.setLevel(level)


def int8_model(onnx_file: Path, tiles: Callable[[], Sequence[np.ndarray]], cache: Optional[Path] = None):
    """The quantized OpenVINO model: read from cache (an .xml path) when it exists, else quantized (tiles() is called
    only then) and written there atomically."""
    import openvino as ov

    if cache is not None and cache.is_file() and cache.with_suffix(".bin").is_file():
        return ov.Core().read_model(str(cache))
    model = quantize_onnx(onnx_file, tiles())
    if cache is not None:
        save_int8(model, cache)
    return model


def save_int8(model, target: Path) -> None:
    """Write the OpenVINO model as target (.xml) and its .bin, both complete or neither (written under temporary
    names, then renamed: the .bin first, so an .xml is never seen without its weights)."""
    import openvino as ov

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.stem}.{os.getpid()}.partial.xml")
    ov.save_model(model, str(partial), compress_to_fp16=False)
    os.replace(partial.with_suffix(".bin"), target.with_suffix(".bin"))
    os.replace(partial, target)
