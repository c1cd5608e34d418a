"""Measuring and reporting, once for every command: the command modules (nnunetv2_recokd/cli/) parse arguments and
call these; tests/test_structure.py keeps it so.

summary.py          Dice from nnU-Net's summary.json (validation or a scored folder), nnU-Net's scoring of predictions
timing.py           the clock: a block's wall time, seconds per case, the median of timed calls, the machine
networks.py         parameters, GFLOPs and latency of a network; the network nnUNetv2_predict builds from a model
                    folder; what a checkpoint records
rows.py             one table row per model (Dice over seeds beside size and speed)
tables.py           every Markdown table the commands write (demo, report, benchmark, benchmark-predict,
                    evaluate-dose)
figures.py          the demo's and the report's figures

The measuring jobs themselves, on these: report.py (`report`), benchmark.py (`benchmark`), predict_benchmark.py
(`benchmark-predict`), gpu_check.py (`gpu-check`), dose.py (`evaluate-dose`); the demo's protocol is
nnunetv2_recokd/demo.py.
"""

from __future__ import annotations

import importlib

# module -> the names it exports here; each imported when first used (importing one module of the package, e.g.
# timing.py for predict's clock, does not import torch's FLOP counter or nnU-Net's evaluation)
_PUBLIC = {
    "summary": ("SUMMARY", "class_names", "predict_and_score", "read_dice", "read_summary", "region_key",
                "score_predictions", "summary_mean_dice", "validation_summary"),
    "timing": ("Stopwatch", "cpu_cores", "cpu_model", "device_name", "machine", "median_ms", "peak_above_current",
               "seconds_per_case", "sync"),
    "networks": ("conv_gflops", "count_checkpoint_parameters", "count_parameters", "find_checkpoint",
                 "inference_latency_ms", "latency_or_reason", "load_checkpoint", "load_inference_network",
                 "mirror_passes", "model_folder_latency_ms", "no_grad_forward", "training_record"),
    "rows": ("inference_row", "model_row", "spread"),
    "tables": ("benchmark_table", "class_columns", "dose_name", "dose_table", "ensemble_table", "fmt", "md_header",
               "md_row", "models_table", "predict_benchmark_table", "report_document", "report_label",
               "report_table"),
    "figures": ("demo_figure", "report_figure"),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
