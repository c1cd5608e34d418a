"""`nnunetv2_recokd benchmark`: time one training step of each trainer against the floor (student step + teacher
forward); the benchmark itself is nnunetv2_recokd/evaluation/benchmark.py."""

from __future__ import annotations

from nnunetv2_recokd.cli.common import cuda_available


def add_parsers(sub) -> None:
    p = sub.add_parser("benchmark", help="time one training step of each trainer against the floor "
                                         "(student step + teacher forward); peak memory; inference latency")
    p.add_argument("--setting", nargs="+", default=["hippocampus"],
                   help="built in: hippocampus (nnU-Net's 3d_fullres U-Net for Dataset004_Hippocampus: 4 stages, "
                        "patch 40x56x40, batch 7; the default) and unet6_128 (6 stages, patch 128^3, batch 2); "
                        "plans: a dataset's plans given with --plans")
    p.add_argument("--plans", help="nnUNetPlans.json whose 3d_fullres configuration --setting plans uses "
                                   "(required by it)")
    p.add_argument("--trainers", nargs="+", default=None,
                   help="distillation trainers to time (default: nnUNetTrainerLogitKD nnUNetTrainerReCoKD "
                        "nnUNetTrainerReCoKDGraph nnUNetTrainerGraphKD)")
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--terms-only", action="store_true",
                   help="only the distillation terms alone (ours vs direct formulas), no training steps")
    p.add_argument("--teachers", nargs="+", type=int, default=[1],
                   help="numbers of teachers to time each trainer with, e.g. 1 2 5 (default 1); each count has its "
                        "own floor: student step + that many teacher forwards")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--md", help="write the Markdown table here")


def main(args) -> int:
    from nnunetv2_recokd.evaluation import benchmark

    print(benchmark.run(args.setting, args.trainers or benchmark.DEFAULT_TRAINERS, args.device, args.steps,
                        args.warmup, args.plans, args.json, args.md, args.terms_only, args.teachers))
    return 0
