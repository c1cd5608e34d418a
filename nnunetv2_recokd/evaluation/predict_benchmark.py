"""`nnunetv2_recokd benchmark-predict`: seconds per case of full prediction, teacher vs student, as users run it.

Every row is one whole command in a fresh process, timed from the outside (process start, imports, model load,
runtime compilation, preprocessing, sliding window, resampling, export): ``nnUNetv2_predict_from_modelfolder``
as stock nnU-Net runs it (its defaults: 3 preprocessing and 3 export worker processes), and
``nnunetv2_recokd predict`` with a runtime (in one process). Seconds per case = wall time / cases. Ratios are
to the teacher's stock command with the same TTA setting. Our command also reports where its time goes
(set-up, preprocessing, network, resampling + export per case).

Then, per patch, one forward of the teacher and the student in PyTorch eager and in the runtimes; and parity:
per-case Dice between the runtime's and PyTorch's label maps of the same model, and the largest logit difference
over the compared cases' whole volumes.

Workloads:
    folders  your teacher and student model folders and an input folder (e.g. held-out Hippocampus cases)
    large    a CT-sized synthetic volume (256 x 256 x 200 voxels at 1 mm) with random-weight 6-stage U-Nets at
             128^3 (teacher 32..320 channels, student width 1/4), where the network dominates; weights do not
             change the time, so no training is needed
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from nnunetv2_recokd.evaluation.tables import predict_benchmark_table
from nnunetv2_recokd.evaluation.timing import Stopwatch, machine, median_ms, seconds_per_case



def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _run(args: list[str], log: Path, env: Optional[dict] = None) -> float:
    """The command's wall time from the outside (process start to exit), its output in `log`."""
    with open(log, "w") as handle, Stopwatch() as watch:
        done = subprocess.run(args, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"command failed ({done.returncode}), see {log}: {' '.join(args)}")
    return watch.seconds


def _labels(folder: Path) -> dict[str, np.ndarray]:
    import SimpleITK as sitk

    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.glob("*.nii*"))}


def make_large_workload(root: Path, num_cases: int = 1, seed: int = 0, num_folds: int = 1) -> tuple[Path, Path, Path]:
    """(teacher folder, student folder, input folder) for the CT-sized synthetic workload; each model folder holds
    num_folds folds (several: the fold ensemble is timed)."""
    import SimpleITK as sitk

    from nnunetv2_recokd import sandbox

    plans = sandbox.unet_plans((32, 64, 128, 256, 320, 320), (128, 128, 128), dataset_name="Dataset992_LargeCT")
    dataset = sandbox.dataset_json()
    results = root / "results" / "Dataset992_LargeCT"
    shutil.rmtree(results, ignore_errors=True)  # no folds left from a run with more
    folds = tuple(range(num_folds))
    teacher = sandbox.write_random_teacher(results / "nnUNetTrainer__nnUNetPlans__3d_fullres", plans, dataset,
                                           folds=folds)
    student = sandbox.write_random_student(results / "nnUNetTrainerReCoKD__nnUNetPlans__3d_fullres", plans, dataset,
                                           folds=folds)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.arange(200), np.arange(256), np.arange(256), indexing="ij")
    for i in range(num_cases):
        body = ((y - 128) / 110) ** 2 + ((x - 128) / 120) ** 2 <= 1  # a body cross-section along z, HU values
        organ = ((z - 100) / 60) ** 2 + ((y - 120) / 40) ** 2 + ((x - 100) / 45) ** 2 <= 1
        hu = np.where(body, 40.0, -1000.0) + np.where(organ, 60.0, 0.0) + rng.normal(0, 20, body.shape)
        image = sitk.GetImageFromArray(hu.astype(np.float32))
        image.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(image, str(images / f"ct_{i:03d}_0000.nii.gz"))
    return teacher, student, images


def per_patch(folder: Path, checkpoint: str, runtimes: Sequence[str], runs: int,
              plain_graph: bool = False, precisions: Sequence[str] = ("f32",),
              calibration: Optional[Path] = None, cache_dir: Optional[Path] = None) -> dict[str, float]:
    """ms per forward of one patch (batch 1) of the folder's first fold: PyTorch eager and each runtime (with
    plain_graph also each runtime on the export without deploy/graph.py's rewrites, key "<runtime> plain"; with
    precisions other than f32 also OpenVINO at each of them, key "openvino <precision>", int8 calibrated on the
    cases of the calibration folder, default: the first fold's training cases; with cache_dir the int8 network
    quantized by an earlier load is reused)."""
    import torch

    from nnunetv2_recokd.deploy.modelfolder import open_model_folder
    from nnunetv2_recokd.deploy.predictor import RuntimePredictor
    from nnunetv2_recokd.deploy.runtime import compile_network
    from nnunetv2_recokd.evaluation.networks import inference_latency_ms

    model = open_model_folder(folder, None, checkpoint)
    predictor = RuntimePredictor("torch")
    predictor.initialize_from_trained_model_folder(str(folder), model.folds[:1], model.checkpoint_name)
    network = predictor.network.eval()
    patch = predictor.configuration_manager.patch_size
    channels = predictor.num_input_channels()
    out = {"torch": inference_latency_ms(network, patch, channels, runs=runs)}
    x = torch.randn(1, channels, *patch)
    variants = [(runtime, True) for runtime in runtimes if runtime != "torch"]
    variants += [(runtime, False) for runtime, _ in variants] if plain_graph else []
    variants = [(runtime, optimize, "f32") for runtime, optimize in variants]
    variants += [("openvino", True, p) for p in precisions if p != "f32" and "openvino" in runtimes]
    for runtime, optimize, precision in variants:
        extra = {}
        if precision == "int8":
            from nnunetv2_recokd.deploy.quantize import calibration_cases, calibration_key, calibration_tiles
            from nnunetv2_recokd.deploy.runtime import onnx_cache_file

            cases = calibration_cases(model, str(calibration) if calibration else None, fold=model.folds[0])
            extra = {"calibration": lambda: calibration_tiles(predictor, cases)}
            if cache_dir is not None:  # the predictor's cache name for this fold, checkpoint and calibration
                onnx_file = onnx_cache_file(model.checkpoint_path(model.folds[0]), x.shape, cache_dir)
                extra["int8_cache"] = onnx_file.with_name(f"{onnx_file.stem}.int8-{calibration_key(cases)}.xml")
        compiled = compile_network(network, x.shape, runtime, optimize_graph=optimize, precision=precision, **extra)
        key = runtime if optimize else f"{runtime} plain"  # one untimed call, then the median of `runs`
        out[key if precision == "f32" else f"{runtime} {precision}"] = median_ms(lambda: compiled(x), x.device, runs,
                                                                                  1)[0]
    return out


def parity(folder: Path, checkpoint: str, images: Path, runtime: str, num_cases: int, tta: bool) -> dict:
    """Runtime vs PyTorch on real preprocessed cases of the same model: the largest |logit| difference of the network
    alone (first sliding-window patch of each case) and of the whole case's logits after nnU-Net's sliding window,
    which accumulates in float16 (so its differences are at float16 resolution of the logits)."""
    import torch
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    from nnunetv2_recokd.deploy.inputfolder import check_input_folder
    from nnunetv2_recokd.deploy.modelfolder import open_model_folder
    from nnunetv2_recokd.deploy.predictor import build_predictor

    model = open_model_folder(folder, None, checkpoint)
    cases = check_input_folder(images, model.dataset_json)[:num_cases]
    reference = build_predictor(model, "torch", tta, 0.5)
    compiled = build_predictor(model, runtime, tta, 0.5)
    network, runtime_network = reference.network.eval(), compiled.fold_networks[0]
    patch = reference.configuration_manager.patch_size
    preprocessor = reference.configuration_manager.preprocessor_class(verbose=False)
    patch_worst = case_worst = 0.0
    for files in cases:
        data, _, _ = preprocessor.run_case(files, None, reference.plans_manager, reference.configuration_manager,
                                           reference.dataset_json)
        data = torch.from_numpy(data)
        first = pad_nd_image(data, patch, "constant", {"value": 0})[(slice(None), *[slice(0, p) for p in patch])]
        with torch.no_grad():
            patch_worst = max(patch_worst, float((network(first[None]) - runtime_network(first[None])).abs().max()))
        a = reference.predict_logits_from_preprocessed_data(data).float()
        b = compiled.predict_logits_from_preprocessed_data(data).float()
        case_worst = max(case_worst, float((a - b).abs().max()))
    return {"cases": len(cases), "max_logit_difference_patch": patch_worst, "max_logit_difference_case": case_worst}


def run(teacher: Path, student: Path, images: Path, out: Path, runtimes: Sequence[str], tta: Sequence[str],
        folds: Optional[Sequence[str]], labels: Optional[Path], patch_runs: int, parity_cases: int,
        workload: str, checkpoints: tuple[str, str] = ("checkpoint_final.pth", "checkpoint_final.pth"),
        patch_runtimes: Optional[Sequence[str]] = None, patch_plain_graph: bool = False,
        precisions: Sequence[str] = ("f32",), calibration: Optional[Path] = None) -> dict:
    """Every row of the benchmark (see the module's docstring). precisions other than f32 add, for the student,
    `predict --runtime openvino --precision P` rows (int8 calibrated on the calibration folder's cases, default: each
    fold's own training images) and per-patch latencies; their Dice against the labels is compared with f32's."""
    from nnunetv2_recokd.deploy.modelfolder import open_model_folder
    from nnunetv2_recokd.deploy.predictor import dice_per_class

    out.mkdir(parents=True, exist_ok=True)
    n_cases = len(list(images.glob("*_0000.*")))
    models = {"teacher": open_model_folder(teacher, folds, checkpoints[0]),
              "student": open_model_folder(student, folds, checkpoints[1])}
    cache = out / "onnx_cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RECOKD_CACHE": str(cache)}
    # a model's first prediction exports it to ONNX once (cached per checkpoint): done here, outside the timings,
    # and its cost reported separately
    from nnunetv2_recokd.deploy.predictor import build_predictor

    first_export_s = {}
    extra_precisions = [p for p in precisions if p != "f32"] if "openvino" in runtimes else []
    calibration_args = ["--calibration", str(calibration)] if calibration else []
    for role, model in models.items():
        for runtime in runtimes:
            if runtime != "torch":
                with Stopwatch() as watch:
                    build_predictor(model, runtime, True, 0.5, cache_dir=cache)
                first_export_s[f"{role}_{runtime}"] = watch.seconds
    for precision in extra_precisions:  # int8: quantization (cached) outside the timings too
        with Stopwatch() as watch:
            build_predictor(models["student"], "openvino", True, 0.5, cache_dir=cache, precision=precision,
                            calibration=str(calibration) if calibration else None)
        first_export_s[f"student_openvino-{precision}"] = watch.seconds
    label_ids = sorted(v for v in models["student"].dataset_json["labels"].values() if isinstance(v, int) and v > 0)
    rows = []
    for tta_setting in tta:
        for role, model in models.items():
            fold_args = ["-f", *map(str, model.folds)]
            commands = [("nnUNetv2_predict (stock, PyTorch)", "stock",
                         [_bin("nnUNetv2_predict_from_modelfolder"), "-m", str(model.path), "-device", "cpu",
                          "--disable_progress_bar", "-chk", model.checkpoint_name])]
            for runtime in runtimes:
                commands.append((f"nnunetv2_recokd predict --runtime {runtime}", runtime,
                                 [_bin("nnunetv2_recokd"), "predict", "-m", str(model.path), "--runtime", runtime,
                                  "-chk", model.checkpoint_name]))
            for precision in extra_precisions if role == "student" else []:
                commands.append((f"nnunetv2_recokd predict --runtime openvino --precision {precision}",
                                 f"openvino-{precision}",
                                 [_bin("nnunetv2_recokd"), "predict", "-m", str(model.path), "--runtime", "openvino",
                                  "-chk", model.checkpoint_name, "--precision", precision, *calibration_args]))
            for label, key, command in commands:
                tag = f"{role}_{key}_tta-{tta_setting}"
                target = out / "predictions" / tag
                shutil.rmtree(target, ignore_errors=True)
                timings_file = out / "logs" / f"{tag}.timings.json"
                (out / "logs").mkdir(exist_ok=True)
                args = [*command, "-i", str(images), "-o", str(target), *fold_args]
                if tta_setting == "off":
                    args.append("--disable_tta")
                if key != "stock":
                    args += ["--timings", str(timings_file)]
                print(f"== {role}: {label}, TTA {tta_setting}, folds {model.folds}", flush=True)
                wall = _run(args, out / "logs" / f"{tag}.log", env)
                row = {"model": role, "command": label, "runtime": "torch" if key == "stock" else key.split("-")[0],
                       "precision": key.split("-")[1] if "-" in key else "f32", "tta": tta_setting,
                       "folds": model.folds, "cases": n_cases, "wall_s": wall,
                       "s_per_case": seconds_per_case(wall, n_cases), "predictions": str(target)}
                if key != "stock":
                    detail = json.loads(timings_file.read_text())
                    cases = detail["cases"]
                    row["breakdown"] = {"setup_s": detail["setup_s"], "compile_s": detail["compile_s"],
                                        **{k: float(np.mean([c[k] for c in cases]))
                                           for k in ("preprocess_s", "network_s", "export_s")}}
                    row["breakdown"]["process_start_and_rest_s"] = wall - detail["setup_s"] - sum(
                        c["preprocess_s"] + c["network_s"] + c["export_s"] for c in cases)
                if labels is not None:
                    predicted, truth = _labels(target), _labels(labels)
                    dices = [dice_per_class(predicted[n], truth[n], label_ids) for n in predicted]
                    row["dice"] = {str(k): float(np.mean([d[k] for d in dices])) for k in label_ids}
                print(f"   {wall:.1f} s, {row['s_per_case']:.2f} s per case", flush=True)
                rows.append(row)
    reference = {(r["tta"]): r["s_per_case"] for r in rows if r["model"] == "teacher" and r["runtime"] == "torch"
                 and r["command"].startswith("nnUNetv2_predict")}
    for row in rows:
        row["ratio_to_teacher_stock"] = row["s_per_case"] / reference[row["tta"]]
    # parity of the label maps: each runtime vs the stock PyTorch prediction of the same model and TTA setting
    checks = []
    for row in rows:
        if row["runtime"] == "torch":
            continue
        stock = next(r for r in rows if r["model"] == row["model"] and r["tta"] == row["tta"]
                     and r["command"].startswith("nnUNetv2_predict"))
        a, b = _labels(Path(row["predictions"])), _labels(Path(stock["predictions"]))
        dices = [min(dice_per_class(a[n], b[n], label_ids).values()) for n in a]
        checks.append({"model": row["model"], "runtime": row["runtime"], "precision": row["precision"],
                       "tta": row["tta"], "min_case_dice_vs_pytorch": float(min(dices)), "cases": len(dices),
                       "voxel_agreement_vs_pytorch": float(np.mean([(a[n] == b[n]).mean() for n in a]))})
        if row["precision"] != "f32" and "dice" in row:  # reduced precision judged against ground truth
            f32 = next(r for r in rows if r["model"] == row["model"] and r["tta"] == row["tta"]
                       and r["command"].startswith("nnUNetv2_predict"))
            row["dice_minus_f32"] = {k: row["dice"][k] - f32["dice"][k] for k in row["dice"]}
    print("== per patch and logit parity", flush=True)
    patches = {role: per_patch(model.path, model.checkpoint_name, patch_runtimes or runtimes, patch_runs,
                               patch_plain_graph, precisions if role == "student" else ("f32",), calibration,
                               cache)
               for role, model in models.items()}
    logit = {}
    if parity_cases > 0:
        for runtime in runtimes:
            if runtime != "torch":
                logit[runtime] = parity(models["student"].path, models["student"].checkpoint_name, images, runtime,
                                        parity_cases, tta=False)
    return {"workload": workload, "machine": machine(), "cases": n_cases, "rows": rows, "label_parity": checks,
            "first_load_with_onnx_export_s": first_export_s,
            "per_patch_ms": patches, "student_logit_parity": logit,
            "teacher": str(models["teacher"].path), "student": str(models["student"].path)}


def write_outputs(result: dict, out: Path) -> str:
    """benchmark_predict.json and benchmark_predict.md in `out`; returns the Markdown."""
    markdown = predict_benchmark_table(result)
    (out / "benchmark_predict.json").write_text(json.dumps(result, indent=1))
    (out / "benchmark_predict.md").write_text(markdown)
    return markdown
