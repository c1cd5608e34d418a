"""Every Markdown table the commands print and write: the demo's (models, fold ensemble), the report's, the
benchmark's, benchmark-predict's and evaluate-dose's, on a few shared helpers (a row, a header, a number)."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from nnunetv2_recokd.evaluation.rows import TIMED_KEYS

TEACHER_TRAINER = "nnUNetTrainer"  # the report marks nnU-Net's stock trainer as the teacher
NOT_VALIDATED = "not validated yet"


# ------------------------------------------------------------------------------------------------ helpers
def md_row(cells: Sequence[str]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def md_header(header: Sequence[str]) -> list[str]:
    """The header row and its separator."""
    return [md_row(header), "|" + "---|" * len(header)]


def fmt(value: Optional[float], spec: str, missing: str = "-") -> str:
    """A number in `spec`, `missing` for None, "nan" for NaN."""
    if value is None:
        return missing
    return "nan" if isinstance(value, float) and math.isnan(value) else format(value, spec)


def class_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Union of the class names of all rows' "dice", in order of first appearance."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row["dice"] if c not in columns]
    return columns


# --------------------------------------------------------------------------------------------------- demo
def _cell(row: dict, mean: float, sd: float) -> str:
    return f"{mean:.3f}" if len(row["seeds"]) < 2 else f"{mean:.3f} ± {sd:.3f}"


def models_table(rows: list[dict], seconds: float, runtime: str) -> str:
    """The demo's table of model_row rows with its note (Dice over seeds, latency, seconds per case with stock
    nnUNetv2_predict and `nnunetv2_recokd predict --runtime <runtime>`, the whole run's minutes)."""
    classes = list(rows[0]["dice"])
    timed = [key for key in TIMED_KEYS if all(key in r for r in rows)]
    columns = {"stock_s_per_case": "s / case, nnUNetv2_predict", "runtime_s_per_case": f"s / case, {runtime}"}
    header = ["model", "trainer", "seeds", *[f"Dice {c}" for c in classes], "mean Dice", "params (M)",
              "GFLOPs/patch", "latency (ms/patch)", *[columns[key] for key in timed]]
    lines = md_header(header)
    for r in rows:
        seeds = ", ".join(str(s) for s in r["seeds"])
        dice = [_cell(r, r["dice"][c], r["dice_sd"][c]) for c in classes]
        cells = [r["model"], f"`{r['trainer']}`", seeds, *dice, _cell(r, r["mean_dice"], r["mean_dice_sd"]),
                 f"{r['params'] / 1e6:.3f}", f"{r['gflops_per_patch']:.2f}", f"{r['latency_ms']:.1f}",
                 *[f"{r[key]:.2f}" for key in timed]]
        lines.append(md_row(cells))
    commands = {"stock_s_per_case": f"`nnUNetv2_predict -device {rows[0]['device']}`",
                "runtime_s_per_case": f"`nnunetv2_recokd predict --runtime {runtime}` (CPU)"}
    n_seeds = max(len(r["seeds"]) for r in rows)
    spread = " Students: mean ± sample standard deviation over the seeds listed." if n_seeds > 1 else ""
    note = (f"\nDice from nnU-Net's evaluation on {rows[0]['evaluated_on']} ({rows[0]['cases']} cases).{spread} "
            f"Latency: one forward of one {rows[0]['patch_size']} patch on {rows[0]['device']}, median of 5. "
            + (f"Seconds per case: the whole command's wall time over the held-out cases, TTA off, "
               f"{' and '.join(commands[key] for key in timed)}; on small cases (the synthetic ones) the commands' "
               f"start-up dominates (per case on real volumes: docs/benchmarks.md). " if timed else "") +
            ("" if "runtime_s_per_case" in timed else
             f"The student's fast CPU path was not timed: {runtime} is not importable here (it comes with this "
             f"package: `pip install openvino onnx` repairs it). ") +
            f"Whole run: {seconds / 60:.1f} min.\n")
    return "\n".join(lines) + "\n" + note


def ensemble_table(story: dict, runtime: str) -> str:
    """Markdown of the demo's --ensemble: one row per way of predicting the held-out cases (inference_row)."""
    rows = story["rows"]
    classes = list(rows[0]["dice"])
    header = ["inference", "trainer", "folds", "TTA", "forwards / patch", *[f"Dice {c}" for c in classes],
              "mean Dice", "params (M)", "GFLOPs / patch, all forwards", "s / case, nnUNetv2_predict",
              f"s / case, {runtime}"]
    lines = [f"### Teacher fold ensemble vs one distilled student (--ensemble {len(story['folds'])})", "",
             *md_header(header)]
    for r in rows:
        timed = f"{r['runtime_s_per_case']:.2f}" if "runtime_s_per_case" in r else "–"
        cells = [r["model"], f"`{r['trainer']}`", ", ".join(map(str, r["folds"])), "on" if r["tta"] else "off",
                 str(r["forwards_per_patch"]), *[f"{r['dice'][c]:.3f}" for c in classes], f"{r['mean_dice']:.3f}",
                 f"{r['params'] / 1e6:.3f}", f"{r['gflops_per_patch']:.2f}", f"{r['stock_s_per_case']:.2f}", timed]
        lines.append(md_row(cells))
    folds = ", ".join(map(str, story["folds"]))
    leak = story.get("teacher_saw_validation_cases") or {}
    validation = story.get("student_fold0_validation_mean_dice")
    seen = (f"teacher folds other than 0 were trained on {leak['cases']} of its {leak['of']} validation cases"
            if leak else "the other fold teachers were trained on its validation cases")
    note = (f"\nDice from nnU-Net's evaluation on the {rows[0]['cases']} held-out test cases, which no model saw in "
            f"training. The student ({story['student_trainer']}, fold 0) was distilled from teacher folds {folds}; "
            f"its own fold-0 validation"
            + (f" (mean Dice {validation:.3f})" if validation is not None else "")
            + f" is optimistic ({seen}), so the held-out cases are the honest measure. "
            f"Forwards / patch: folds x mirrorings (TTA); params: the weights the inference loads; GFLOPs: one "
            f"{rows[0]['patch_size']} patch position, all forwards. Seconds per case: the whole command's wall time "
            f"over the held-out cases, `nnUNetv2_predict -device {rows[0]['device']}` and, TTA off, `nnunetv2_recokd "
            f"predict --runtime {runtime}` (CPU; – : not run).\n")
    return "\n".join(lines) + "\n" + note


# ------------------------------------------------------------------------------------------------- report
def report_label(row: dict[str, Any]) -> str:
    """The report's name of a model: the trainer, nnU-Net's stock one marked as the teacher."""
    return f"{row['trainer']} (teacher)" if row["trainer"] == TEACHER_TRAINER else row["trainer"]


def report_table(rows: list[dict[str, Any]]) -> str:
    """The report's comparison table: trainer, width, params (M), Dice per class, mean Dice, latency; notes below
    it; then the held-out table when models were tested."""
    from nnunetv2_recokd.unlabeled import min_agreement_note

    classes = class_columns(rows)
    header = ["trainer", "width", "params (M)", *[f"Dice {c}" for c in classes], "mean Dice", "latency (ms)"]
    lines = md_header(header)
    notes = []
    for row in rows:
        params = fmt(row["params"] / 1e6 if row["params"] is not None else None, ".3f")
        mean = fmt(row["mean_dice"], ".4f") if row["status"] == "validated" else NOT_VALIDATED
        leak = row.get("validation_optimistic")
        if leak and row["status"] == "validated":
            mean += " (optimistic)"
            folds = leak["teacher_fold"]
            if isinstance(folds, list):  # an ensemble of teachers (several folds)
                notes.append(f"- {row['trainer']}: validation OPTIMISTIC: its teachers (folds "
                             f"{', '.join(map(str, folds))}) were trained on {leak['cases']} of the {leak['of']} "
                             f"validation cases between them; held-out cases (imagesTs/labelsTs) give the honest Dice")
            else:
                notes.append(f"- {row['trainer']}: validation OPTIMISTIC: its teacher was trained on {leak['cases']} "
                             f"of the {leak['of']} validation cases (teacher fold {folds})")
        cases = row.get("training_cases")
        if cases:
            notes.append(f"- {row['trainer']}: trained on {cases['real']} cases with real labels and "
                         f"{cases['teacher_labelled']} labelled by the teacher (seg-loss weight "
                         f"{cases.get('teacher_label_weight', 1):g}{min_agreement_note(cases.get('min_agreement'))})")
            if cases.get("validation_teacher_labelled") and row["status"] == "validated":
                mean += " (vs teacher)"
                notes.append(f"- {row['trainer']}: {cases['validation_teacher_labelled']} of its "
                             f"{cases.get('validation')} validation cases are labelled by the teacher: its validation "
                             f"Dice is AGREEMENT WITH THE TEACHER, not accuracy")
        dice = [fmt(row["dice"].get(c), ".4f") for c in classes]
        latency = fmt(row["latency_ms"], ".1f", "n/a")
        lines.append(md_row([report_label(row), f"{row['width']:g}", params, *dice, mean, latency]))
        if row["latency_ms"] is None and row["latency_note"] and "--no-latency" not in row["latency_note"]:
            notes.append(f"- {row['trainer']}: latency n/a: {row['latency_note']}")
        if row["status"] == "validated":
            ckpt = row["checkpoint"] or "no checkpoint"
            notes.append(f"- {row['trainer']}: {row['n_cases']} validation cases, {ckpt}")
    return "\n".join(lines + ([""] + notes if notes else []) + _test_table(rows)) + "\n"


def _test_table(rows: list[dict[str, Any]]) -> list[str]:
    """Lines of the held-out table (Dice on imagesTs/labelsTs, seconds per case), empty when nothing was tested."""
    tested = [r for r in rows if r.get("test") or r.get("test_note")]
    if not tested:
        return []
    classes: list[str] = []
    for row in tested:
        classes += [c for c in (row["test"] or {}).get("dice", {}) if c not in classes]
    n_cases = max((row["test"] or {}).get("n_cases", 0) for row in tested)
    runtime = next((r["test"]["runtime"] for r in tested if r["test"] and r["test"].get("runtime")), None)
    header = ["trainer", *[f"Dice {c}" for c in classes], "mean Dice", "s / case"] + (
        [f"s / case, CPU {runtime}"] if runtime else [])
    lines = ["", f"Held-out cases (imagesTs/labelsTs, {n_cases} cases; nnU-Net's predictor and evaluation; not seen "
                 f"by any teacher or student):", "", *md_header(header)]
    for row in tested:
        test = row["test"]
        if test is None:
            lines.append(md_row([report_label(row), *["-"] * (len(header) - 1)]))
            continue
        lines.append(md_row([report_label(row), *[fmt(test["dice"].get(c), ".4f") for c in classes],
                             fmt(test["mean_dice"], ".4f"), fmt(test["seconds_per_case"], ".2f"),
                             *([fmt(test.get("runtime_seconds_per_case"), ".2f")] if runtime else [])]))
    lines += [f"- {r['trainer']}: held-out cases not evaluated: {r['test_note']}" for r in tested if r["test_note"]]
    return lines


def report_document(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """report.md: the heading (dataset, configuration, fold, plans; where Dice and latency come from) and the
    tables."""
    heading = (f"# ReCo-KD report: {meta['dataset']} {meta['configuration']} fold {meta['fold']} ({meta['plans']})"
               f"\n\nDice: nnU-Net's validation summary.json of each model. Latency: one forward pass on one "
               f"patch {meta['patch_size']}, batch 1, {meta['device']}, median of {meta['runs']} runs.\n\n")
    return heading + report_table(rows)


# ---------------------------------------------------------------------------------------------- benchmark
def benchmark_table(results: list[dict]) -> str:
    """`nnunetv2_recokd benchmark`: per setting the floor, the trainers' steps against it, and the terms alone."""
    lines = []
    for r in results:
        lines.append(f"**{r['setting']}**: patch {r['patch_size']}, batch {r['batch_size']}, {r['n_stages']} stages, "
                     f"{r['device']}.")
        lines.append("")
        if "floor_ms" in r:
            lines.append(f"Floor (student step + teacher forward, timed together) {r['floor_ms']:.1f} ms "
                         f"(student step alone {r['student_step_ms']:.1f} ms, teacher forward alone "
                         f"{r['teacher_forward_ms']:.1f} ms). Inference on one patch: teacher "
                         f"{r['teacher_inference_ms']:.1f} ms ({r['teacher_params'] / 1e6:.2f} M params), student "
                         f"{r['student_inference_ms']:.1f} ms ({r['student_params'] / 1e6:.2f} M params).")
            lines.append("")
            floors = r.get("floors") or [{"teachers": 1, "floor_ms": r["floor_ms"]}]
            several = [f["teachers"] for f in floors] != [1]
            if several:
                lines.append("Several teachers: the floor of N teachers is a student step plus N teacher forwards, "
                             "timed together: " + "; ".join(
                                 f"{f['teachers']} teacher(s) {f['floor_ms']:.1f} ms (teacher forwards alone "
                                 f"{f['teacher_forward_ms']:.1f} ms)" for f in floors) + ".")
                lines.append("")
            lines.append(("| teachers " if several else "") + "| trainer | ms / step | ratio to floor | peak memory "
                         "| peak ratio |")
            lines.append(("|---" if several else "") + "|---|---|---|---|---|")
            for t in r["trainers"]:
                peak = f"{t['peak_gib']:.2f} GiB" if t["peak_gib"] is not None else "n/a (CPU)"
                ratio = f"{t['peak_ratio']:.2f}" if t["peak_ratio"] is not None else "n/a"
                lines.append((f"| {t.get('teachers', 1)} " if several else "") + f"| {t['trainer']} | "
                             f"{t['ms_per_step']:.1f} | {t['ratio_to_floor']:.2f} | {peak} | {ratio} |")
            lines.append("")
        reco = r.get("reco_terms")
        if reco:
            lines.append(f"ReCo-KD terms alone (MS-SARD + MS-CA + adapters, {reco['stages']} encoder stages, forward + "
                         "backward): ours vs the formulas computed directly.")
            lines.append("")
            lines.append("| implementation | ms | kept for backward | peak above features |")
            lines.append("|---|---|---|---|")
            for name in ("ours", "direct"):
                peak = reco[f"{name}_peak_mib"]
                lines.append(f"| {name} | {reco[f'{name}_ms']:.1f} | {reco[f'{name}_saved_mib']:.0f} MiB | "
                             + (f"{peak:.0f} MiB |" if peak is not None else "n/a (CPU) |"))
            lines.append("")
        graph = r.get("graph_terms")
        if graph:
            peak = f", peak above the features {graph['peak_mib']:.0f} MiB" if graph["peak_mib"] is not None else ""
            lines.append(f"Region-graph terms alone on {', '.join(graph['stages'])} (regions, connected components, "
                         f"pooling, node/edge/GW terms, forward + backward; nodes per graph "
                         f"{graph['nodes_per_graph']}): {graph['ms']:.1f} ms{peak}.")
            lines.append("")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- benchmark-predict
def predict_benchmark_table(result: dict) -> str:
    """`nnunetv2_recokd benchmark-predict`: seconds per case per command, ms per patch per runtime, reduced
    precision against f32, the one-off exports and the parity checks."""
    lines = [f"Workload: {result['workload']} ({result['cases']} cases). Machine: {result['machine']}.", "",
             "| model | command | TTA | folds | s per case | x teacher stock | set-up s | preprocess s | network s "
             "| export s | Dice per class |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        b = r.get("breakdown")
        cells = ([f"{b['setup_s']:.1f}", f"{b['preprocess_s']:.2f}", f"{b['network_s']:.2f}", f"{b['export_s']:.2f}"]
                 if b else ["", "", "", ""])
        dice = " / ".join(f"{v:.3f}" for v in r["dice"].values()) if "dice" in r else ""
        lines.append(f"| {r['model']} | {r['command']} | {r['tta']} | {','.join(map(str, r['folds']))} | "
                     f"{r['s_per_case']:.2f} | {r['ratio_to_teacher_stock']:.3f} | " + " | ".join(cells)
                     + f" | {dice} |")
    keys = [k for values in result["per_patch_ms"].values() for k in values if k != "torch"]
    keys = list(dict.fromkeys(keys))  # every runtime/precision timed, in order, once
    lines += ["", "| model | PyTorch eager ms / patch | " + " | ".join(keys) + " | x teacher eager (each) |",
              "|---|---|" + "---|" * len(keys) + "---|"]
    teacher_eager = result["per_patch_ms"]["teacher"]["torch"]
    for role, values in result["per_patch_ms"].items():
        cells = [f"{values[k]:.1f}" if k in values else "" for k in keys]
        ratios = " / ".join(f"{k}: {values[k] / teacher_eager:.3f}" for k in ["torch", *keys] if k in values)
        lines.append(f"| {role} | {values['torch']:.1f} | " + " | ".join(cells) + f" | {ratios} |")
    reduced = [r for r in result["rows"] if r.get("dice_minus_f32")]
    if reduced:
        lines += ["", "| model | command | TTA | Dice per class | minus f32 (stock PyTorch) per class |",
                  "|---|---|---|---|---|"]
        for r in reduced:
            lines.append(f"| {r['model']} | {r['command']} | {r['tta']} | "
                         + " / ".join(f"{v:.4f}" for v in r["dice"].values()) + " | "
                         + " / ".join(f"{v:+.4f}" for v in r["dice_minus_f32"].values()) + " |")
    lines.append("")
    for key, seconds in result.get("first_load_with_onnx_export_s", {}).items():
        lines.append(f"- {key.replace('_', ' with ')}: first load including the one-off ONNX export (cached per "
                     f"checkpoint, not in the timings above): {seconds:.1f} s")
    for c in result["label_parity"]:
        lines.append(f"- {c['model']} {c['runtime']} {c.get('precision', 'f32')} (TTA {c['tta']}): lowest per-case "
                     f"Dice vs PyTorch over {c['cases']} cases: {c['min_case_dice_vs_pytorch']:.4f}; voxels with the "
                     f"same label: {c.get('voxel_agreement_vs_pytorch', float('nan')):.5f}")
    for runtime, p in result["student_logit_parity"].items():
        lines.append(f"- student {runtime}, max |logit difference| vs PyTorch on {p['cases']} real cases: network "
                     f"alone (one patch per case) {p['max_logit_difference_patch']:.1e}; whole case after nnU-Net's "
                     f"float16 sliding-window accumulation {p['max_logit_difference_case']:.1e}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ evaluate-dose
def dose_name(dose: float) -> str:
    """A dose fraction as folders and tables name it."""
    return f"{dose:g}"


def dose_table(result: dict[str, Any]) -> str:
    """`nnunetv2_recokd evaluate-dose`: Dice per class and mean per simulated dose, with how the dose was
    simulated."""
    classes = list(result["rows"][0]["dice"]) if result["rows"] else []
    sim = result["simulation"]
    lines = [f"# Dice per dose: {result['model']}", "",
             f"{result['n_cases']} held-out case(s) from {result['images']}, labels {result['labels']}; folds "
             f"{', '.join(map(str, result['folds']))} ({result['checkpoint']}), TTA {'on' if result['tta'] else 'off'}."
             f" CT channel(s) {', '.join(map(str, result['channels']))} degraded on axial slices (Zeng et al. 2015 "
             f"transmission model, noise of the dose difference): i0 {sim['i0']:g}, electronic noise "
             f"{sim['electronic_noise']:.3g}, views {sim['n_angles'] or 'slice side'}, window {sim['window']}; "
             f"seed {result['seed']}. Dice: nnU-Net's evaluation, mean over cases.", "",
             "| dose | " + " | ".join(classes) + " | mean |", "|---" * (len(classes) + 2) + "|"]
    for row in result["rows"]:
        cells = ["-" if row["dice"][c] is None else f"{row['dice'][c]:.4f}" for c in classes]
        mean = "-" if row["mean_dice"] is None else f"{row['mean_dice']:.4f}"
        lines.append(f"| {dose_name(row['dose'])} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines) + "\n"
