"""`nnunetv2_recokd demo`: the whole protocol with nnU-Net's own commands, on data that needs no download.

1. a synthetic dataset (organ with small lesions; or --dataset ID, an existing nnU-Net dataset)
2. nnUNetv2_plan_and_preprocess
3. nnUNetv2_train: teacher (full width), the plain student control, the ReCo-KD student (short schedules)
4. nnUNetv2_predict on held-out cases and nnUNetv2_evaluate_folder (synthetic: the generated test cases;
   --dataset: imagesTs/labelsTs when the dataset has them, else nnU-Net's fold validation)
5. a table (Markdown and JSON) of per-class Dice, parameters, GFLOPs per patch and inference latency, and a
   figure (Dice per class and latency side by side)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from nnunetv2_recokd.synthetic import write_dataset

SYNTHETIC_ID = 990
MODELS = (("teacher", "nnUNetTrainerTeacher"), ("student", "nnUNetTrainerStudent"),
          ("ReCo-KD student", "nnUNetTrainerReCoKD"))


def nnunet_command(name: str) -> str:
    """Path of an installed console script (nnUNetv2_train, ...), next to this Python first."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: is nnU-Net v2 installed in this environment?")
    return found


def run_logged(args: list[str], env: dict, log: Path, timeout: Optional[int] = None) -> str:
    """Run an nnU-Net command with its output in `log`; on failure raise with the log's tail."""
    with open(log, "w") as f:
        proc = subprocess.run([nnunet_command(args[0]), *args[1:]], env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (exit {proc.returncode}); last lines of {log}:\n"
                           f"{text[-3000:]}")
    return text


class Progress:
    def __init__(self, total_steps: int):
        self.start, self.total, self.done = time.time(), total_steps, 0

    def step(self, what: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total} | {time.time() - self.start:6.0f} s] {what}", flush=True)


def main(out: str, device: str, dataset: Optional[str], teacher_epochs: int, student_epochs: int,
         iterations: int, num_train: int, num_test: int) -> int:
    out_dir = Path(out).resolve()
    work = out_dir / "nnunet"
    env = dict(os.environ)
    if dataset is None:
        env.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
                   nnUNet_results=str(work / "results"))
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not env.get(key):
            raise SystemExit(f"--dataset needs {key} set (the folders of your nnU-Net installation)")
    env.update(nnUNet_compile=env.get("nnUNet_compile", "f" if device == "cpu" else "t"), PYTHONUNBUFFERED="1")
    if device == "cpu":
        env.update(nnUNet_def_n_proc=env.get("nnUNet_def_n_proc", "1"), nnUNet_npp="0", nnUNet_nps="0")
    env.pop("RECOKD_TEACHER", None)
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    progress = Progress(2 + 2 * len(MODELS))  # data, planning, then one training and one evaluation per model

    if dataset is None:
        dataset_id = str(SYNTHETIC_ID)
        folder = write_dataset(work / "raw", SYNTHETIC_ID, num_train=num_train, num_test=num_test, size=48,
                               lesion_radius=0.15, seed=0)
        progress.step(f"synthetic dataset written: {folder} ({num_train} training, {num_test} held-out cases)")
    else:
        dataset_id = dataset
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        try:
            folder = Path(env["nnUNet_raw"]) / maybe_convert_to_dataset_name(dataset)
        except RuntimeError as e:
            raise SystemExit(f"dataset {dataset} not found: {e}") from None
        progress.step(f"using dataset {folder}")
    name = folder.name
    pre = Path(env["nnUNet_preprocessed"]) / name
    if not (pre / "nnUNetPlans.json").is_file():
        run_logged(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", "3d_fullres", "-np", "1"], env,
                   logs / "plan.log")
    progress.step(f"planned and preprocessed ({pre})")

    train_env = {**env, "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", "0" if device == "cpu" else "")}
    if not train_env["nnUNet_n_proc_DA"]:
        train_env.pop("nnUNet_n_proc_DA")
    for label, trainer in MODELS:
        epochs = teacher_epochs if trainer == "nnUNetTrainerTeacher" else student_epochs
        cfg = out_dir / f"config_{trainer}.json"
        cfg.write_text(json.dumps({"num_epochs": epochs, "num_iterations_per_epoch": iterations,
                                   "num_val_iterations_per_epoch": 2, "save_every": max(1, epochs),
                                   "teacher_trainer": "nnUNetTrainerTeacher"}))
        run_logged(["nnUNetv2_train", dataset_id, "3d_fullres", "0", "-tr", trainer, "-device", device],
                   {**train_env, "RECOKD_CONFIG": str(cfg)}, logs / f"train_{trainer}.log")
        progress.step(f"trained {label} ({trainer}, {epochs} x {iterations} iterations)")

    rows = []
    held_out = folder / "imagesTs", folder / "labelsTs"
    for label, trainer in MODELS:
        model_folder = Path(env["nnUNet_results"]) / name / f"{trainer}__nnUNetPlans__3d_fullres"
        if held_out[0].is_dir() and held_out[1].is_dir():
            pred = out_dir / "predictions" / trainer
            run_logged(["nnUNetv2_predict", "-i", str(held_out[0]), "-o", str(pred), "-d", dataset_id, "-c",
                        "3d_fullres", "-tr", trainer, "-f", "0", "-device", device, "--disable_tta",
                        "-npp", "1", "-nps", "1"], env, logs / f"predict_{trainer}.log")
            run_logged(["nnUNetv2_evaluate_folder", str(held_out[1]), str(pred), "-djfile",
                        str(pre / "dataset.json"), "-pfile", str(pre / "nnUNetPlans.json")], env,
                       logs / f"evaluate_{trainer}.log")
            summary, source = pred / "summary.json", "held-out test cases"
        else:
            summary, source = model_folder / "fold_0" / "validation" / "summary.json", "fold 0 validation"
        rows.append(model_row(label, trainer, model_folder, summary, source, device))
        progress.step(f"evaluated {label} on {source}")

    write_outputs(rows, out_dir)
    return 0


def model_row(label: str, trainer: str, model_folder: Path, summary_file: Path, source: str, device: str) -> dict:
    """One table row: Dice per class from nnU-Net's summary.json, size and speed of the network that
    nnUNetv2_predict builds for this model folder."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_recokd.profiling import conv_gflops, count_parameters, inference_latency_ms

    summary = json.loads(summary_file.read_text())
    labels = json.loads((model_folder / "dataset.json").read_text())["labels"]
    names = {str(v): k for k, v in labels.items() if not isinstance(v, list)}
    dice = {names.get(k, k): v["Dice"] for k, v in summary["mean"].items()}
    predictor = nnUNetPredictor(device=torch.device(device), perform_everything_on_device=device == "cuda",
                                verbose=False, verbose_preprocessing=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    patch = predictor.configuration_manager.patch_size
    net = predictor.network
    return {"model": label, "trainer": trainer, "dice": dice, "mean_dice": summary["foreground_mean"]["Dice"],
            "evaluated_on": source, "cases": len(summary.get("metric_per_case", [])),
            "params": count_parameters(net), "gflops_per_patch": conv_gflops(net, patch),
            "latency_ms": inference_latency_ms(net, patch, device=torch.device(device)), "patch_size": list(patch),
            "device": device}


def write_outputs(rows: list[dict], out_dir: Path) -> None:
    classes = list(rows[0]["dice"])
    header = ["model", "trainer", *[f"Dice {c}" for c in classes], "mean Dice", "params (M)", "GFLOPs/patch",
              "latency (ms/patch)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["model"], f"`{r['trainer']}`", *[f"{r['dice'][c]:.3f}" for c in classes], f"{r['mean_dice']:.3f}",
                 f"{r['params'] / 1e6:.3f}", f"{r['gflops_per_patch']:.2f}", f"{r['latency_ms']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\nDice from nnU-Net's evaluation on {rows[0]['evaluated_on']} ({rows[0]['cases']} cases); latency: one "
            f"forward of one {rows[0]['patch_size']} patch on {rows[0]['device']}, median of 5.\n")
    table = "\n".join(lines) + "\n" + note
    (out_dir / "table.md").write_text(table)
    (out_dir / "table.json").write_text(json.dumps(rows, indent=1))
    plot(rows, classes, out_dir / "figure.png")
    print(table)
    print(f"written: {out_dir / 'table.md'}, {out_dir / 'table.json'}, {out_dir / 'figure.png'}")


def plot(rows: list[dict], classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, (ax_dice, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(classes))]
        bars = ax_dice.bar(xs, [r["dice"][c] for c in classes], width, label=r["model"])
        ax_dice.bar_label(bars, fmt="%.2f", fontsize=8)
    ax_dice.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(classes))], classes)
    ax_dice.set(ylim=(0, 1.25), ylabel="Dice", title="Dice per class")
    ax_dice.legend(loc="upper center", ncol=len(rows), fontsize=8)  # above the bars, never over them
    bars = ax_lat.bar([r["model"] for r in rows], [r["latency_ms"] for r in rows],
                      color=[f"C{i}" for i in range(len(rows))])
    ax_lat.bar_label(bars, labels=[f"{r['latency_ms']:.0f} ms\n{r['params'] / 1e6:.2f} M params" for r in rows],
                     fontsize=8)
    ax_lat.set(ylabel="ms per patch", title=f"inference latency ({rows[0]['device']})")
    ax_lat.set_ylim(0, max(r["latency_ms"] for r in rows) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
