"""nnU-Net's own predictor with each fold's network run by a CPU inference runtime.

Everything but the network call is nnU-Net's code, unchanged: preprocessing (``preprocessor.run_case``), the
sliding window with Gaussian weighting and mirroring (``predict_sliding_window_return_logits``), the fold
ensemble (logits averaged over folds), resampling to the original geometry and export
(``export_prediction_from_logits``). ``RuntimePredictor`` only swaps ``self.network`` for the fold's compiled
network before each sliding window.

In-process prediction (``predict_cases``, the default: no worker processes to start) also times each case's
stages and writes each case through a hidden staging folder, so an interrupted run leaves only complete files
(``--continue_prediction`` then skips them), checks each input file before it is read (deploy/integrity.py: nnU-Net's
default reader takes a truncated NIfTI file for a whole one) and, with ``keep_going``, goes on past a case that
fails and names every failed case at the end (CaseFailures).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunetv2_recokd.deploy.integrity import CorruptInputError, check_image_file
from nnunetv2_recokd.deploy.modelfolder import DeployError, ModelFolder
from nnunetv2_recokd.deploy.quantize import (
    CALIBRATION_CASES,
    calibration_cases,
    calibration_key,
    calibration_tiles,
    exported_int8,
    require_nncf,
)
from nnunetv2_recokd.deploy.runtime import DEFAULT_RUNTIME, compile_network, onnx_cache_file, require_runtime

STAGING = ".recokd_partial"


class CaseFailures(DeployError):
    """Some cases could not be predicted (predict_cases with keep_going); every other case was.

    Attributes:
        failures: {case: why}, in the order the cases were tried.
        timings: the CaseTiming of every case that was predicted.
    """

    def __init__(self, failures: dict[str, str], timings: list[CaseTiming]):
        self.failures = failures
        self.timings = timings
        listing = "\n  ".join(f"{case}: {why}" for case, why in failures.items())
        super().__init__(f"{len(failures)} case(s) could not be predicted (the other {len(timings)} were):\n  "
                         f"{listing}")


@dataclasses.dataclass
class CaseTiming:
    case: str
    preprocess_s: float
    network_s: float
    export_s: float

    @property
    def total_s(self) -> float:
        return self.preprocess_s + self.network_s + self.export_s


class RuntimePredictor(nnUNetPredictor):
    """nnUNetPredictor on the CPU whose network is compiled by ``runtime`` (one compiled network per fold)."""

    def __init__(self, runtime: str = DEFAULT_RUNTIME, threads: Optional[int] = None, tile_step_size: float = 0.5,
                 use_mirroring: bool = True, verbose: bool = False, allow_tqdm: bool = False,
                 cache_dir: Optional[Path] = None, use_cache: bool = True, precision: str = "f32",
                 calibration: Optional[str] = None, calibration_cases: int = CALIBRATION_CASES):
        require_runtime(runtime)  # before anything is loaded: a missing runtime is the first thing said
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's note that CPU runs are not "on device"
            super().__init__(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                             perform_everything_on_device=False, device=torch.device("cpu"), verbose=verbose,
                             verbose_preprocessing=verbose, allow_tqdm=allow_tqdm)
        self.runtime = runtime
        self.threads = threads
        self.cache_dir = cache_dir
        self.use_cache = use_cache
        self.precision = precision
        self.calibration = calibration  # int8: folder of calibration images (None: the model's training images)
        self.calibration_cases = calibration_cases
        self.fold_networks: list[torch.nn.Module] = []
        self.compile_seconds = 0.0

    def initialize_from_trained_model_folder(self, model_training_output_dir: str,
                                             use_folds: Union[Sequence[Union[int, str]], None],
                                             checkpoint_name: str = "checkpoint_final.pth") -> None:
        """nnU-Net's initialisation (network rebuilt from the trainer class and plans), then one compiled network
        per fold."""
        if use_folds is None:  # detected once, here, so the compiled networks pair with nnU-Net's fold parameters
            use_folds = self.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
        with _direct_trainer_lookup():
            super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        network = getattr(self.network, "_orig_mod", self.network)  # nnUNet_compile=t wraps it
        input_shape = (1, self.num_input_channels(), *self.configuration_manager.patch_size)
        start = time.perf_counter()
        self.fold_networks = []
        folds = [use_folds] if isinstance(use_folds, str) else list(use_folds)
        int8 = (self._int8_inputs(model_training_output_dir, folds, checkpoint_name) if self.precision == "int8"
                else None)
        for fold, params in zip(folds, self.list_of_parameters):
            if self.runtime == "torch":
                self.fold_networks.append(None)  # nnU-Net's own loop loads each fold's weights
                continue
            network.load_state_dict(params)
            checkpoint = Path(model_training_output_dir) / f"fold_{fold}" / checkpoint_name
            cache = onnx_cache_file(checkpoint, input_shape, self.cache_dir) if self.use_cache else None
            extra = {}
            if int8 is not None:
                model, calibrations = int8
                tiles, key = calibrations.get(fold, (None, "exported"))
                extra = {"calibration": tiles, "int8_file": exported_int8(model, fold),
                         "int8_cache": cache.with_name(f"{cache.stem}.int8-{key}.xml") if cache else None}
            self.fold_networks.append(compile_network(network, input_shape, self.runtime, self.threads, cache,
                                                      self.precision, **extra))
        self.compile_seconds = time.perf_counter() - start

    def _int8_inputs(self, folder: str, folds: list, checkpoint_name: str) -> tuple[ModelFolder, dict]:
        """(model folder, {fold: (calibration tiles, computed on first use; calibration key)}) for int8, one entry
        per fold that lacks an exported int8 network: each fold is calibrated on its own cases (calibration_cases),
        all of them resolved here, before anything is compiled. Folds in a row with the same cases (--calibration)
        share one computation of the tiles; only the latest tiles are kept in memory.

        Raises:
            DeployError: a cascade stage, NNCF not installed, or a fold's calibration cases not found.
        """
        from nnunetv2_recokd.deploy.modelfolder import open_model_folder

        model = open_model_folder(folder, folds, checkpoint_name)
        if self.configuration_manager.previous_stage_name is not None:
            raise DeployError("--precision int8 is not available for a cascade stage (its calibration would need the "
                              "previous stage's segmentations); use f32")
        missing = [fold for fold in folds if exported_int8(model, fold) is None]
        if not missing:
            return model, {}
        require_nncf()
        latest: dict = {}  # {cases: tiles}, at most one entry
        calibrations = {}
        for fold in missing:
            cases = calibration_cases(model, self.calibration, self.calibration_cases, fold=fold)
            calibrations[fold] = (_tiles_on_first_use(self, cases, latest), calibration_key(cases))
        return model, calibrations

    def num_input_channels(self) -> int:
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

        return determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's fold loop (logits summed over folds, then divided), each fold through its compiled network."""
        if self.runtime == "torch":
            return super().predict_logits_from_preprocessed_data(data)
        prediction = None
        for network in self.fold_networks:
            self.network = network
            logits = self.predict_sliding_window_return_logits(data).to("cpu")
            prediction = logits if prediction is None else prediction + logits
        if len(self.fold_networks) > 1:
            prediction /= len(self.fold_networks)
        return prediction


def _tiles_on_first_use(predictor: nnUNetPredictor, cases: list[list[str]],
                        latest: dict) -> Callable[[], list[np.ndarray]]:
    """A function returning the calibration tiles of the cases, computed when first called; `latest` holds the last
    computed tiles by their cases, reused while the cases are the same (one set of tiles in memory at a time)."""
    key = tuple(map(tuple, cases))

    def tiles() -> list[np.ndarray]:
        if key not in latest:
            latest.clear()
            latest[key] = calibration_tiles(predictor, cases)
        return latest[key]
    return tiles


@contextlib.contextmanager
def _direct_trainer_lookup():
    """nnU-Net finds the trainer class by importing every module of its trainer folder (about 0.5 s of a
    prediction command's start), and only calls its build_network_architecture. For nnU-Net's stock trainer and
    ours the network follows from the plans alone (_PlansNetwork), which also spares importing nnU-Net's trainer
    module (its logger imports the plotting stack: about 0.7 s more). Any other name goes through nnU-Net's own
    lookup."""
    import nnunetv2.inference.predict_from_raw_data as nnunet_predict

    from nnunetv2_recokd.trainer_names import PUBLIC_TRAINERS

    walk = nnunet_predict.recursive_find_trainer_class_by_name

    def lookup(name: str, *args, **kwargs):
        if name == "nnUNetTrainer" or name in PUBLIC_TRAINERS:
            return _PlansNetwork(name)
        return walk(name, *args, **kwargs)

    nnunet_predict.recursive_find_trainer_class_by_name = lookup
    try:
        yield
    finally:
        nnunet_predict.recursive_find_trainer_class_by_name = walk


class _PlansNetwork:
    """Stands in for a trainer class in nnU-Net's initialize_from_trained_model_folder, which only calls its
    build_network_architecture: nnU-Net's network from the plans (stock trainer), or the student a model folder's
    plans record (our trainers; a folder whose plans lack the record gets the trainer's shipped width, exactly what
    the trainer class's own build_network_architecture returns)."""

    def __init__(self, trainer_name: str):
        self.trainer_name = trainer_name

    def build_network_architecture(self, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> torch.nn.Module:
        from nnunetv2_recokd.student import recorded_student_spec, student_network_from_plans

        if self.trainer_name == "nnUNetTrainer":  # as nnUNetTrainer.build_network_architecture
            from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

            return get_network_from_plans(configuration_manager.network_arch_class_name,
                                          configuration_manager.network_arch_init_kwargs,
                                          configuration_manager.network_arch_init_kwargs_req_import,
                                          num_input_channels, num_output_channels, allow_init=True,
                                          deep_supervision=enable_deep_supervision)
        if recorded_student_spec(configuration_manager.configuration):  # the defaults below are then unused
            return student_network_from_plans(configuration_manager, num_input_channels, num_output_channels,
                                              enable_deep_supervision, 1.0, 1)
        # a folder whose plans lack the record: the trainer's shipped width, as its build_network_architecture
        # (trainers/base.py) reads it, without importing the trainers
        from nnunetv2_recokd.config import default_settings

        defaults = default_settings(self.trainer_name)
        return student_network_from_plans(configuration_manager, num_input_channels, num_output_channels,
                                          enable_deep_supervision, defaults.student_width,
                                          defaults.student_min_channels)


def previous_stage_files(model: ModelFolder, cases: list[list[str]],
                         folder: Optional[Union[str, Path]]) -> Optional[list[str]]:
    """The previous stage's segmentation of each case for a cascade stage (None for any other configuration).

    A cascade stage (3d_cascade_fullres) reads the previous stage's (3d_lowres) segmentation as extra input channels,
    so, as for nnUNetv2_predict, its predictions must be given (-prev_stage_predictions). Every case is checked
    before any network is built.

    Raises:
        DeployError: a cascade stage without the folder, cases missing from it, or the folder given to a model that is
            not a cascade stage.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    previous = PlansManager(model.plans).get_configuration(model.configuration).previous_stage_name
    if previous is None:
        if folder is not None:
            raise DeployError("-prev_stage_predictions is for a cascade stage; this model's configuration has no "
                              "previous stage")
        return None
    if folder is None:
        raise DeployError(f"this model is a cascade stage: it reads the segmentation of its previous stage "
                          f"({previous}) of every case; predict the cases with the {previous} model first and give "
                          f"that output folder with -prev_stage_predictions, as for nnUNetv2_predict")
    ending = model.dataset_json["file_ending"]
    files = [os.path.join(str(folder), os.path.basename(c[0])[: -len(ending) - 5] + ending) for c in cases]
    missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
    if missing:
        raise DeployError(f"-prev_stage_predictions {folder} lacks the {previous} segmentation of {len(missing)} "
                          f"case(s): {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    return files


def predict_cases(predictor: nnUNetPredictor, cases: list[list[str]], output_folder: Union[str, Path],
                  save_probabilities: bool = False, overwrite: bool = True,
                  log=print, previous_stage: Optional[list[str]] = None,
                  predict: Optional[Callable] = None, export: Optional[Callable] = None,
                  keep_going: bool = False) -> list[CaseTiming]:
    """Predict the cases in this process, one after the other, with nnU-Net's preprocessing and export.

    Each case is exported into ``<output_folder>/.recokd_partial`` and moved into place once complete, its
    segmentation last: an output file is either complete or absent, and a case counts as done (overwrite=False, as
    nnUNetv2_predict --continue_prediction: skipped, never rewritten) when its segmentation exists, and with
    save_probabilities its .npz too. Each input file is checked before the case is read (deploy/integrity.py).
    Returns one CaseTiming per predicted case (cases skipped because their output exists are not listed).
    previous_stage: a cascade stage's input segmentation per case (previous_stage_files), appended one-hot as nnU-Net's
    predictor does. predict(data) -> prediction and export(prediction, properties, output_truncated) -> note or None
    replace nnU-Net's logits and export (default: predictor.predict_logits_from_preprocessed_data,
    export_prediction_from_logits); a note ends the case's log line.

    Raises:
        CaseFailures: keep_going and some cases failed (an input file that cannot be read, an error in the network
            or the export): raised after every other case was predicted, naming each failed case and why.
        Exception: without keep_going, the first case's error as it is raised (CorruptInputError for a damaged
            file).
    """
    from nnunetv2.inference.export_prediction import export_prediction_from_logits
    from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

    output = Path(output_folder)
    output.mkdir(parents=True, exist_ok=True)
    staging = output / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    ending = predictor.dataset_json["file_ending"]
    _write_json(output / "dataset.json", predictor.dataset_json)
    _write_json(output / "plans.json", predictor.plans_manager.plans)
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=predictor.verbose)
    timings: list[CaseTiming] = []
    failures: dict[str, str] = {}
    foreground = predictor.plans_manager.get_label_manager(predictor.dataset_json).foreground_labels
    if predict is None:
        def predict(data: torch.Tensor) -> torch.Tensor:
            return predictor.predict_logits_from_preprocessed_data(data).cpu()
    if export is None:
        def export(logits: torch.Tensor, properties: dict, output_truncated: str) -> None:
            export_prediction_from_logits(logits, properties, predictor.configuration_manager, predictor.plans_manager,
                                          predictor.dataset_json, output_truncated, save_probabilities)

    def run(i: int, case: str, stage: list[str]) -> tuple[CaseTiming, Optional[str]]:
        stage[0] = "reading"
        t0 = time.perf_counter()
        seg_file = previous_stage[i] if previous_stage is not None else None
        for file in cases[i] + ([seg_file] if seg_file is not None else []):
            check_image_file(file)
        data, seg, properties = preprocessor.run_case(cases[i], seg_file, predictor.plans_manager,
                                                      predictor.configuration_manager, predictor.dataset_json)
        if seg_file is not None:  # nnU-Net's predictor: the previous stage's labels as one-hot input channels
            data = np.vstack((data, convert_labelmap_to_one_hot(seg[0], foreground, data.dtype)))
        stage[0] = "running the network"
        t1 = time.perf_counter()
        prediction = predict(torch.from_numpy(data))
        del data
        stage[0] = "exporting"
        t2 = time.perf_counter()
        note = export(prediction, properties, str(staging / case))
        del prediction
        produced = sorted(staging.glob(f"{case}.*"), key=lambda p: (p.name == f"{case}{ending}", p.name))
        for file in produced:  # .npz/.pkl with probabilities first, the segmentation (what marks the case done) last
            os.replace(file, output / file.name)
        return CaseTiming(case, t1 - t0, t2 - t1, time.perf_counter() - t2), note

    try:
        for i, files in enumerate(cases):
            case = os.path.basename(files[0])[: -len(ending) - 5]
            if not overwrite and case_done(output, case, ending, save_probabilities):
                log(f"{case}: exists, skipped (--continue_prediction)")
                continue
            stage = ["reading"]
            try:
                timing, note = run(i, case, stage)
            except Exception as e:
                if not keep_going:
                    raise
                why = _reason(e, stage[0])
                failures[case] = why
                for leftover in staging.glob(f"{case}.*"):
                    leftover.unlink()
                log(f"{case}: FAILED, {why}")
                continue
            timings.append(timing)
            log(f"{case}: {timing.total_s:.2f} s (preprocess {timing.preprocess_s:.2f}, network "
                f"{timing.network_s:.2f}, resample + export {timing.export_s:.2f})" + (f"; {note}" if note else ""))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if failures:
        raise CaseFailures(failures, timings)
    return timings


def case_done(output: Path, case: str, ending: str, save_probabilities: bool) -> bool:
    """nnUNetv2_predict's test of a case already predicted: its segmentation exists (and with save_probabilities
    its .npz)."""
    return (output / f"{case}{ending}").is_file() and (not save_probabilities or (output / f"{case}.npz").is_file())


def _reason(error: Exception, stage: str) -> str:
    """One line for a failed case: where it failed and the last line of the error (SimpleITK's messages run to many
    lines of C++ source locations; the last line says what is wrong)."""
    if isinstance(error, CorruptInputError):
        return str(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[-1] if lines else ""
    return f"{stage}: {type(error).__name__}" + (f": {message}" if message else "")


def _write_json(path: Path, obj: dict) -> None:
    """As nnU-Net's save_json(obj, path, sort_keys=False), written atomically and only when the content changes (a
    rerun into the same folder rewrites nothing)."""
    import json

    text = json.dumps(obj, sort_keys=False, indent=4)
    try:
        if path.read_text() == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def build_predictor(model: ModelFolder, runtime: str, use_mirroring: bool, tile_step_size: float,
                    threads: Optional[int] = None, verbose: bool = False, use_cache: bool = True,
                    cache_dir: Optional[Path] = None, precision: str = "f32", calibration: Optional[str] = None,
                    calibration_cases: int = CALIBRATION_CASES) -> RuntimePredictor:
    predictor = RuntimePredictor(runtime=runtime, threads=threads, tile_step_size=tile_step_size,
                                 use_mirroring=use_mirroring, verbose=verbose, use_cache=use_cache,
                                 cache_dir=cache_dir, precision=precision, calibration=calibration,
                                 calibration_cases=calibration_cases)
    predictor.initialize_from_trained_model_folder(str(model.path), model.folds, model.checkpoint_name)
    return predictor


def dice_per_class(a: np.ndarray, b: np.ndarray, labels: Sequence[int]) -> dict[int, float]:
    """Dice between two label maps per label (1.0 where the label is absent from both)."""
    out = {}
    for label in labels:
        x, y = a == label, b == label
        denominator = x.sum() + y.sum()
        out[int(label)] = 1.0 if denominator == 0 else float(2 * np.logical_and(x, y).sum() / denominator)
    return out
