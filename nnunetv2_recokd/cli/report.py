"""`nnunetv2_recokd report`: compare the teacher and our trainers on a dataset from nnU-Net's results folders; the
report itself is nnunetv2_recokd/evaluation/report.py."""

from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    p = sub.add_parser("report", help="compare the teacher and our trainers on a dataset from nnU-Net's results "
                                      "folders (validation Dice per class, parameters, latency)")
    p.add_argument("dataset", help="dataset name or ID")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-f", "--fold", default="0")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("--out", help="output folder (default: $nnUNet_results/<Dataset>/recokd_report)")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                   help="time one forward pass per model, rebuilt as nnUNetv2_predict does")
    p.add_argument("--device", default="cpu", help="device for the latency (cpu or cuda)")
    p.add_argument("--runs", type=int, default=5, help="timed forward passes per model (median reported)")
    p.add_argument("--test", action=argparse.BooleanOptionalAction, default=True,
                   help="also predict and score every model on the held-out cases, when $nnUNet_raw/<Dataset> has "
                        "imagesTs and labelsTs (Dice per class, seconds per case; predictions in OUT/test_predictions)")
    p.add_argument("--tta", action="store_true", help="mirroring at test-set prediction (nnU-Net's default; slower)")


def main(args: argparse.Namespace) -> int:
    """`nnunetv2_recokd report DATASET ...`: collect, print, write report.md/json/png."""
    import torch

    from nnunetv2_recokd.evaluation import report

    if args.device.startswith("cuda") and args.latency and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    text, out = report.run(args.dataset, args.configuration, str(args.fold), args.plans, args.out, args.latency,
                           args.device, args.runs, getattr(args, "test", True), getattr(args, "tta", False))
    print(text)
    print(f"written: {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}")
    return 0
