"""A student model folder -> a model folder stock nnU-Net predicts without this package.

nnUNetv2_predict rebuilds a network from the trainer class named in the checkpoint and the model folder's plans.
A student of ours names one of our trainers, whose build_network_architecture reads the width from plans.json,
so predicting it needs this package. The export writes the student's architecture itself into the plans
(``features_per_stage`` scaled) under a plans name of its own, names nnU-Net's stock ``nnUNetTrainer`` in
the checkpoints and keeps only what the predictor reads (network weights, trainer name, init args, mirroring
axes). Preprocessing is untouched (same data identifier, normalisation, spacing), so predictions are identical.

Written to ``<out>/<Dataset>/nnUNetTrainer__<plans name>__<configuration>/``: with ``out`` = $nnUNet_results,
``nnUNetv2_predict -d <Dataset> -c <configuration> -p <plans name> -tr nnUNetTrainer -f ...`` finds it. Everything
is written into a staging folder and renamed into place once verified: a failed export leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import zipfile
from copy import deepcopy
from pathlib import Path
from typing import Optional, Union

import torch

from nnunetv2_recokd.deploy.graph import split_concat_convs
from nnunetv2_recokd.deploy.modelfolder import DeployError, ModelFolder
from nnunetv2_recokd.deploy.quantize import (
    CALIBRATION_CASES,
    INT8_SUFFIX,
    calibration_cases,
    calibration_tiles,
    quantize_onnx,
    require_nncf,
    save_int8,
)
from nnunetv2_recokd.deploy.runtime import compile_network, export_onnx, max_logit_difference
from nnunetv2_recokd.student import PLANS_KEY, student_arch_kwargs, student_spec

STOCK_TRAINER = "nnUNetTrainer"
EXPORT_KEY = "recokd_export"  # provenance in the exported plans.json (stock nnU-Net ignores unknown keys)


@dataclasses.dataclass
class ExportResult:
    folder: Path
    plans_name: str
    configuration: str
    folds: list
    zip_file: Optional[Path] = None
    onnx_files: list = dataclasses.field(default_factory=list)
    onnx_max_difference: Optional[float] = None
    int8_files: list = dataclasses.field(default_factory=list)

    def predict_command(self, dataset_name: str) -> str:
        folds = " ".join(map(str, self.folds))
        return (f"nnUNetv2_predict -i INPUT -o OUTPUT -d {dataset_name} -c {self.configuration} -p {self.plans_name} "
                f"-tr {STOCK_TRAINER} -f {folds}")


def default_plans_name(model: ModelFolder) -> str:
    """<source plans name>_<trainer without the nnUNetTrainer prefix>, e.g. nnUNetPlans_ReCoKD."""
    short = model.trainer_name.removeprefix("nnUNetTrainer") or model.trainer_name
    return f"{model.plans['plans_name']}_{short}"


def stock_plans(model: ModelFolder, plans_name: str) -> dict:
    """The model folder's plans with the student architecture spelled out in the exported configuration.

    The configuration is written resolved (``inherits_from`` expanded) with ``features_per_stage`` scaled and the
    width key removed; the other configurations are kept as they are.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if "__" in plans_name or "/" in plans_name or not plans_name:
        raise DeployError(f"plans name {plans_name!r} must be non-empty without '__' or '/' (nnU-Net splits model "
                          "folder names at '__')")
    manager = PlansManager(deepcopy(model.plans))
    configuration = deepcopy(manager.get_configuration(model.configuration).configuration)
    spec = student_spec(configuration, 1.0, 1)
    configuration.pop(PLANS_KEY, None)
    configuration.pop("inherits_from", None)
    architecture = configuration["architecture"]
    architecture["arch_kwargs"] = student_arch_kwargs(architecture["arch_kwargs"], spec["width"],
                                                      spec["min_channels"])
    plans = deepcopy(model.plans)
    plans["plans_name"] = plans_name
    plans["configurations"][model.configuration] = configuration
    plans[EXPORT_KEY] = {"source": str(model.path), "trainer": model.trainer_name,
                         "source_plans": model.plans["plans_name"], "configuration": model.configuration,
                         "width": spec["width"], "min_channels": spec["min_channels"]}
    return plans


def build_stock_network(plans: dict, dataset_json: dict, configuration: str) -> tuple[torch.nn.Module, int]:
    """The inference network stock nnU-Net builds from these plans (nnUNetTrainer.build_network_architecture) and
    its number of input channels."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(plans)
    cm = manager.get_configuration(configuration)
    channels = determine_num_input_channels(manager, cm, dataset_json)
    heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    network = nnUNetTrainer.build_network_architecture(manager, cm, channels, heads, enable_deep_supervision=False)
    return network, channels


def export_stock_model(model: ModelFolder, out_root: Union[str, Path], plans_name: Optional[str] = None,
                       zip_file: Optional[Union[str, Path]] = None, onnx: bool = False,
                       overwrite: bool = False, int8: bool = False, calibration: Optional[str] = None,
                       calibration_cases: int = CALIBRATION_CASES) -> ExportResult:
    """Write the stock model folder (and optionally the install zip, one ONNX file per fold, and with int8 one
    int8 OpenVINO network per fold, calibrated on the cases deploy/quantize.py's calibration_cases picks).

    Raises:
        DeployError: the folder is not a student of ours, the target exists (without overwrite), or a fold's
            weights do not load strictly into the stock network.
    """
    if int8:
        require_nncf()  # before anything is written
    if not model.is_student:
        raise DeployError(f"{model.path} is not an nnunetv2-recokd student: its plans.json has no '{PLANS_KEY}' entry "
                          f"for configuration {model.configuration} (trainer {model.trainer_name}). Stock nnU-Net "
                          "predicts such a folder as it is; export is for folders written by our trainers")
    plans_name = plans_name or default_plans_name(model)
    plans = stock_plans(model, plans_name)
    dataset_root = Path(out_root) / model.dataset_name
    target = dataset_root / f"{STOCK_TRAINER}__{plans_name}__{model.configuration}"
    if target.resolve() == model.path.resolve():
        raise DeployError(f"the export target {target} is the source folder; choose another plans name")
    if target.exists() and not overwrite:
        raise DeployError(f"{target} exists; remove it, choose another plans name (--plans-name) or pass --overwrite")
    dataset_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".recokd_export_", dir=dataset_root))
    result = ExportResult(target, plans_name, model.configuration, list(model.folds))
    try:
        _write_json(staging / "plans.json", plans)
        _write_json(staging / "dataset.json", model.dataset_json)
        if (model.path / "dataset_fingerprint.json").is_file():
            shutil.copy2(model.path / "dataset_fingerprint.json", staging / "dataset_fingerprint.json")
        network, channels = build_stock_network(deepcopy(plans), model.dataset_json, model.configuration)
        patch = plans["configurations"][model.configuration]["patch_size"]
        differences = []
        for fold in model.folds:
            checkpoint = model.read_checkpoint(fold)
            try:
                network.load_state_dict(checkpoint["network_weights"])  # strict: the stock network must fit
            except RuntimeError as e:
                raise DeployError(f"fold {fold}: the weights do not fit the network stock nnU-Net builds from the "
                                  f"exported plans: {str(e)[:400]}") from None
            fold_dir = staging / f"fold_{fold}"
            fold_dir.mkdir()
            init_args = {"plans": plans, "configuration": model.configuration, "fold": fold,
                         "dataset_json": model.dataset_json}
            stock = {"network_weights": checkpoint["network_weights"], "trainer_name": STOCK_TRAINER,
                     "init_args": init_args, "current_epoch": checkpoint.get("current_epoch"),
                     "inference_allowed_mirroring_axes": checkpoint.get("inference_allowed_mirroring_axes"),
                     EXPORT_KEY: {"trainer": model.trainer_name, "source_checkpoint": str(model.checkpoint_path(fold))}}
            torch.save(stock, fold_dir / model.checkpoint_name)
            if onnx:
                onnx_file = fold_dir / (Path(model.checkpoint_name).stem + ".onnx")
                export_onnx(network, (1, channels, *patch), onnx_file, dynamic_batch=True)
                differences.append(_onnx_parity(network, onnx_file, (1, channels, *patch)))
                result.onnx_files.append(target / fold_dir.name / onnx_file.name)
        if differences:
            result.onnx_max_difference = max(differences)
        if int8:
            result.int8_files = [target / p.parent.name / p.name
                                 for p in write_int8_networks(model, staging, calibration, calibration_cases)]
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if zip_file is not None:
        result.zip_file = write_install_zip(target, Path(zip_file))
    return result


def _onnx_parity(network: torch.nn.Module, onnx_file: Path, shape) -> float:
    """max |PyTorch - ONNX Runtime| logits on a seeded random input, or NaN if ONNX Runtime is not installed."""
    try:  # the written file is compiled as the predictor compiles a cached export
        session = compile_network(network, shape, "onnxruntime", onnx_cache=onnx_file)
    except DeployError:
        return float("nan")
    return max_logit_difference(network, session, torch.randn(*shape, generator=torch.Generator().manual_seed(0)))


def write_install_zip(model_folder: Path, zip_file: Path) -> Path:
    """The zip nnUNetv2_install_pretrained_model_from_zip extracts into $nnUNet_results: paths start with
    <Dataset>/<Trainer>__<plans>__<configuration>/. ONNX files are left out (the zip is for nnU-Net); int8 networks
    stay in (small, and `nnunetv2_recokd predict --precision int8` on the installed folder uses them)."""
    zip_file.parent.mkdir(parents=True, exist_ok=True)
    partial = zip_file.with_name(zip_file.name + ".partial")
    root = model_folder.parent.parent
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(model_folder.rglob("*")):
            if path.is_file() and path.suffix != ".onnx":
                archive.write(path, path.relative_to(root).as_posix())
    os.replace(partial, zip_file)
    return zip_file


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2))


def write_int8_networks(model: ModelFolder, target_root: Path, calibration: Optional[str] = None,
                        num_cases: int = CALIBRATION_CASES) -> list[Path]:
    """Quantize every fold of the model, each calibrated on its own cases (calibration_cases), and write
    ``<target_root>/fold_<f>/<checkpoint stem>.int8.xml`` (+ .bin), which ``predict --precision int8`` then uses
    without calibration images. Returns the written .xml files.

    Raises:
        DeployError: NNCF not installed, a cascade stage, or a fold's calibration cases not found (every fold's are
            looked up before anything is quantized).
    """
    import onnx

    from nnunetv2_recokd.deploy.predictor import RuntimePredictor

    require_nncf()
    reference = RuntimePredictor("torch")
    reference.initialize_from_trained_model_folder(str(model.path), model.folds, model.checkpoint_name)
    if reference.configuration_manager.previous_stage_name is not None:
        raise DeployError("int8 is not available for a cascade stage (its calibration would need the previous "
                          "stage's segmentations)")
    cases = {fold: calibration_cases(model, calibration, num_cases, fold=fold) for fold in model.folds}
    network = getattr(reference.network, "_orig_mod", reference.network).eval()
    shape = (1, reference.num_input_channels(), *reference.configuration_manager.patch_size)
    written = []
    tiles, tiles_cases = None, None  # the last fold's tiles, reused while the cases are the same (--calibration)
    for fold, params in zip(model.folds, reference.list_of_parameters):
        if cases[fold] != tiles_cases:
            tiles, tiles_cases = None, None  # the previous fold's tiles are freed before the next are made
            tiles, tiles_cases = calibration_tiles(reference, cases[fold]), cases[fold]
        network.load_state_dict(params)
        with tempfile.TemporaryDirectory(prefix="recokd_int8_") as tmp:
            onnx_file = Path(tmp) / "network.onnx"
            export_onnx(network, shape, onnx_file)
            onnx.save(split_concat_convs(onnx.load(str(onnx_file)))[0], str(onnx_file))
            target = Path(target_root) / f"fold_{fold}" / (Path(model.checkpoint_name).stem + INT8_SUFFIX)
            save_int8(quantize_onnx(onnx_file, tiles), target)
        written.append(target)
    return written
