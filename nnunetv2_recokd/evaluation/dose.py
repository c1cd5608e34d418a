"""`nnunetv2_recokd evaluate-dose`: Dice per class of a model on held-out cases at several simulated doses, as
REACT-KD's robustness table reports a student under dose degradation.

For each dose the CT channels of the raw input images (in HU) get the noise of that dose fraction
(``nnunetv2_recokd.inputs.lowdose``, on whole axial slices: the projection plane is the image's axial plane,
found from its direction cosines), the degraded images are written to a folder, the model predicts them with
nnU-Net's own ``nnUNetPredictor`` in this process, and nnU-Net's ``compute_metrics_on_folder`` scores the
predictions against the labels. Dose 1.0 predicts the input images themselves. Any nnU-Net model folder works
(a teacher, a student of ours, a stock export).

Seeded: the noise of a case, channel and dose depends only on --seed, the case name, the channel and the dose, so
the same command gives the same table, and adding a dose or a case leaves the others unchanged.

Output in -o: dose_<d>/ (predictions and nnU-Net's summary.json per dose), dose_table.md, dose_table.json, and with
--keep-images the degraded inputs in images_dose_<d>/.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from nnunetv2_recokd.deploy.modelfolder import DeployError, ModelFolder
from nnunetv2_recokd.evaluation.summary import predict_and_score
from nnunetv2_recokd.evaluation.tables import dose_name, dose_table


# --------------------------------------------------------------------------------------------- checks
def ct_channels_of(model: ModelFolder, override: Optional[Sequence[int]]) -> list[int]:
    """--channels, or the channels the model's plans normalise with CTNormalization."""
    from nnunetv2_recokd.inputs.lowdose import ct_channels

    names = model.dataset_json.get("channel_names", model.dataset_json.get("modality", {}))
    if override:
        bad = [c for c in override if not 0 <= c < len(names)]
        if bad:
            raise DeployError(f"--channels {bad}: the model has {len(names)} input channel(s) "
                              f"({', '.join(f'{k}: {v}' for k, v in names.items())})")
        return sorted(set(override))
    schemes = model.plans["configurations"][model.configuration].get("normalization_schemes", [])
    channels = ct_channels(schemes)
    if not channels:
        described = ", ".join(f"{c} {names.get(str(c), '?')}: {s}" for c, s in enumerate(schemes))
        raise DeployError(f"the model's plans normalise no channel with CTNormalization ({described}), so no input "
                          f"is known to be CT in HU; name the channels that hold CT in HU with --channels")
    return channels


def case_names(cases: list[list[str]], ending: str) -> list[str]:
    return [re.sub(r"_\d{4}" + re.escape(ending) + "$", "", Path(files[0]).name) for files in cases]


def check_labels(names: Sequence[str], labels: Path, ending: str) -> None:
    if not labels.is_dir():
        raise DeployError(f"labels folder {labels} does not exist")
    missing = [f"{name}{ending}" for name in names if not (labels / f"{name}{ending}").is_file()]
    if missing:
        raise DeployError(f"{len(missing)} case(s) have no reference label in {labels}: {', '.join(missing)}")


def check_doses(doses: Sequence[float]) -> list[float]:
    bad = [d for d in doses if not 0 < d <= 1]
    if bad:
        raise DeployError(f"doses must be fractions in (0, 1] of the scans' dose, got {bad}")
    return list(dict.fromkeys(float(d) for d in doses))


def check_settings(settings: dict[str, Any]) -> None:
    i0, noise, views = settings.get("i0", 1.0), settings.get("electronic_noise", 0.0), settings.get("n_angles")
    if not i0 > 0 or not noise >= 0 or (views is not None and views < 1):
        raise DeployError(f"need --i0 > 0, --electronic-noise >= 0 and --n-angles >= 1, got {i0}, {noise}, {views}")


# ------------------------------------------------------------------------------------ degrading images
def slice_axis(image) -> int:
    """The array axis (SimpleITK order z, y, x) closest to the patient's head-foot axis: the axis the slices are
    stacked along, so the other two span the axial plane."""
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)  # column k: index axis k in LPS
    return 2 - int(np.argmax(np.abs(direction[2])))


def case_seed(seed: int, name: str, channel: int, dose: float) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode()), channel, round(dose * 1e6)])
               .generate_state(1, np.uint64)[0] >> 1)


def degrade_file(source: Path, target: Path, dose: float, seed: int, device: torch.device,
                 settings: dict[str, Any]) -> None:
    """Read a CT image in HU with SimpleITK, simulate the dose on its axial slices, write it with the same
    geometry (float32)."""
    import SimpleITK as sitk

    from nnunetv2_recokd.inputs.lowdose import simulate_low_dose

    try:
        image = sitk.ReadImage(str(source))
    except RuntimeError as e:
        raise DeployError(f"cannot read {source} with SimpleITK ({str(e).strip().splitlines()[-1]}); evaluate-dose "
                          f"reads and writes CT images with SimpleITK (NIfTI, MHA, NRRD, ...)") from None
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
        raise DeployError(f"{source}: expected a 2-D or 3-D scalar CT image, got {image.GetDimension()}-D with "
                          f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))  # array order
    axis = slice_axis(image) if array.ndim == 3 else None
    if axis is not None:
        array = np.moveaxis(array, axis, 0)
        spacing = (spacing[axis],) + tuple(s for i, s in enumerate(spacing) if i != axis)
    generator = torch.Generator(device=device).manual_seed(seed)
    hu = torch.from_numpy(np.ascontiguousarray(array))[None].to(device)
    low = simulate_low_dose(hu, dose, spacing, generator=generator, **settings)[0].cpu().numpy()
    if axis is not None:
        low = np.moveaxis(low, 0, axis)
    result = sitk.GetImageFromArray(np.ascontiguousarray(low))
    result.CopyInformation(image)
    sitk.WriteImage(result, str(target), useCompression=True)


def write_degraded_inputs(cases: list[list[str]], names: Sequence[str], channels: Sequence[int], dose: float,
                          folder: Path, seed: int, device: torch.device, settings: dict[str, Any]) -> None:
    """Every case's channel files into `folder`: CT channels degraded to `dose`, the others copied."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, files in zip(names, cases):
        for channel, source in enumerate(files):
            target = folder / Path(source).name
            if channel in channels:
                degrade_file(Path(source), target, dose, case_seed(seed, name, channel, dose), device, settings)
            else:
                shutil.copyfile(source, target)


# ----------------------------------------------------------------------------------- predict and score
def make_predictor(model: ModelFolder, device: torch.device, tta: bool, step_size: float):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(tile_step_size=step_size, use_mirroring=tta, device=device,
                                    perform_everything_on_device=device.type == "cuda", verbose=False,
                                    allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model.path), use_folds=tuple(model.folds),
                                                       checkpoint_name=model.checkpoint_name)
    return predictor


# ---------------------------------------------------------------------------------------------- output
def evaluate(model: ModelFolder, images: Path, labels: Path, out: Path, doses: Sequence[float],
             channels: Optional[Sequence[int]] = None, seed: int = 0, device: str = "cpu", tta: bool = True,
             step_size: float = 0.5, keep_images: bool = False, settings: Optional[dict[str, Any]] = None,
             log=print) -> dict[str, Any]:
    """The table as a dict (also written to out/dose_table.json and .md). Raises DeployError on bad inputs."""
    from nnunetv2_recokd.deploy.inputfolder import check_input_folder

    settings = dict(settings or {})
    doses = check_doses(doses)
    check_settings(settings)
    chosen = ct_channels_of(model, channels)
    ending = model.dataset_json["file_ending"]
    cases = check_input_folder(images, model.dataset_json)
    names = case_names(cases, ending)
    check_labels(names, labels, ending)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeployError("-device cuda requested but CUDA is not available")
    out.mkdir(parents=True, exist_ok=True)
    predictor = make_predictor(model, dev, tta, step_size)
    rows = []
    with tempfile.TemporaryDirectory(dir=out, prefix=".degraded_") as scratch:
        for dose in doses:
            folder = images
            if dose < 1:
                folder = out / f"images_dose_{dose_name(dose)}" if keep_images else Path(scratch) / dose_name(dose)
                write_degraded_inputs(cases, names, chosen, dose, folder, seed, dev, settings)
            predictions = out / f"dose_{dose_name(dose)}"
            scores, _ = predict_and_score(predictor, folder, predictions, labels)
            row = {"dose": dose, **scores, "predictions": str(predictions)}
            rows.append(row)
            log(f"dose {dose_name(dose)}: mean Dice {row['mean_dice']:.4f} over {row['n_cases']} case(s)")
            if dose < 1 and not keep_images:
                shutil.rmtree(folder)
    result = {"model": str(model.path), "trainer": model.trainer_name, "configuration": model.configuration,
              "folds": model.folds, "checkpoint": model.checkpoint_name, "images": str(images),
              "labels": str(labels), "cases": names, "n_cases": len(names), "channels": chosen, "seed": seed,
              "tta": tta, "device": device, "simulation": _settings_record(settings), "rows": rows}
    (out / "dose_table.json").write_text(json.dumps(result, indent=1))
    (out / "dose_table.md").write_text(dose_table(result))
    return result


def _settings_record(settings: dict[str, Any]) -> dict[str, Any]:
    from nnunetv2_recokd.inputs import lowdose

    return {"i0": settings.get("i0", lowdose.DEFAULT_I0),
            "electronic_noise": settings.get("electronic_noise", lowdose.DEFAULT_ELECTRONIC_NOISE),
            "n_angles": settings.get("n_angles"), "window": settings.get("window", lowdose.DEFAULT_WINDOW),
            "mu_water_per_mm": lowdose.MU_WATER_PER_MM, "reference_views": lowdose.REFERENCE_VIEWS}
