"""`nnunetv2_recokd` command line: install, ext-path, doctor, the demo/benchmark/report jobs, export/predict for
deployment, and gpu-check (the GPU checks in one run)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from nnunetv2_recokd.cli import demo, deploy, plugin, predict_benchmark


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2_recokd",
                                     description="Knowledge distillation trainers for nnU-Net v2")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("install", help="make our trainers visible to nnU-Net (writes a shim module into nnU-Net's "
                                       "trainer folder)")
    p.add_argument("--uninstall", action="store_true", help="remove the shim again")

    sub.add_parser("ext-path", help="print the folder to export as nnUNet_extTrainer (alternative to install)")

    p = sub.add_parser("doctor", help="check nnU-Net, trainer discovery and the teacher that would be used")
    p.add_argument("-d", "--dataset", help="dataset name or ID, to also check its teacher")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-f", "--fold", default="0")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainerLogitKD", help="whose settings to resolve")
    p.add_argument("-p", "--plans", default="nnUNetPlans")

    p = sub.add_parser("demo", help="the whole protocol on a synthetic dataset (or --dataset): plan, train the "
                                    "teacher, a control on 2 labelled cases and students on those 2 + 12 scans the "
                                    "teacher labels (--few-labels 0: all labels), predict, evaluate, table and figure")
    p.add_argument("--out", default="recokd_demo", help="output folder (table.md, table.json, figure.png, logs)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dataset", help="run on this existing nnU-Net dataset (name or ID) instead of synthetic data")
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help=f"default {demo.TEACHER_EPOCHS[True]} (--few-labels story), "
                        f"{demo.TEACHER_EPOCHS[False]} (--few-labels 0 or --dataset)")
    p.add_argument("--student-epochs", type=int, default=None,
                   help=f"default {demo.STUDENT_EPOCHS[True]} (--few-labels story), "
                        f"{demo.STUDENT_EPOCHS[False]} (--few-labels 0 or --dataset)")
    p.add_argument("--iterations", type=int, default=20, help="iterations per epoch")
    p.add_argument("--num-train", type=int, default=10, help="synthetic training cases")
    p.add_argument("--num-test", type=int, default=4, help="synthetic held-out cases")
    p.add_argument("--seed", type=int, default=0, help="seed of the teacher and of the first student seed")
    p.add_argument("--seeds", type=int, default=1, help="train the students with this many seeds (seed, seed+1, "
                                                        "...): the table gives mean and spread per class")
    p.add_argument("--warmup", type=float, help="warm-up fraction of the distillation terms (default: the "
                                                 "trainers' own, ReCo-KD's 0.6; 0 = active from the first step)")
    p.add_argument("--results", help="results folder to train into (default: OUT/nnunet/results; never your "
                                     "nnUNet_results unless you name it here)")
    p.add_argument("--few-labels", type=int, default=None, metavar="K",
                   help=f"the unlabeled-scans story (synthetic data, a harder varied set; default K = "
                        f"{demo.FEW_LABELS}): the teacher trains on the labelled cases and labels --unlabeled "
                        "new scans; students train on K labelled cases alone (the control) and on those K + the "
                        "teacher-labelled scans. 0: the easy set, every model on all labels (the default with "
                        "--dataset)")
    p.add_argument("--unlabeled", type=int, default=demo.UNLABELED, metavar="M",
                   help="new scans the teacher labels (--few-labels)")
    p.add_argument("--ensemble", type=int, default=0, metavar="N",
                   help="also train the teacher's folds 1..N-1, distil the N folds into one student "
                        "(nnUNetTrainerLogitKD_ensemble) and add a table on the held-out cases: fold ensemble + TTA "
                        "vs one fold + TTA vs the student, Dice per class and seconds per case (0: off; 2-3 on a CPU)")

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
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--terms-only", action="store_true",
                   help="only the distillation terms alone (ours vs direct formulas), no training steps")
    p.add_argument("--teachers", nargs="+", type=int, default=[1],
                   help="numbers of teachers to time each trainer with, e.g. 1 2 5 (default 1); each count has its "
                        "own floor: student step + that many teacher forwards")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--md", help="write the Markdown table here")

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
    deploy.add_parsers(sub)
    predict_benchmark.add_parser(sub)
    from nnunetv2_recokd.cli import dose, gpu_check, unlabeled

    dose.add_parser(sub)
    gpu_check.add_parser(sub)
    unlabeled.add_parser(sub)
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "install":
        return plugin.install(uninstall=args.uninstall)
    if args.command == "ext-path":
        return plugin.print_ext_path()
    if args.command == "doctor":
        return plugin.doctor(args.dataset, args.configuration, args.fold, args.trainer, args.plans)
    if args.command == "demo":
        return demo.main(args.out, args.device, args.dataset, args.teacher_epochs, args.student_epochs,
                         args.iterations, args.num_train, args.num_test, args.seed, args.seeds, args.results,
                         args.warmup, ensemble=args.ensemble, few_labels=args.few_labels,
                         unlabeled=args.unlabeled)
    if args.command == "benchmark":
        from nnunetv2_recokd.cli import benchmark

        return benchmark.main(args.setting, args.trainers or benchmark.DEFAULT_TRAINERS, args.device, args.steps,
                              args.warmup, args.plans, args.json, args.md, args.terms_only, args.teachers)
    if args.command == "report":
        from nnunetv2_recokd.cli import report

        return report.main(args)
    if args.command == "export":
        return deploy.export_main(args)
    if args.command == "predict":
        return deploy.predict_main(args)
    if args.command == "student-inputs":
        return deploy.student_inputs_main(args)
    if args.command == "benchmark-predict":
        return predict_benchmark.main(args)
    if args.command == "evaluate-dose":
        from nnunetv2_recokd.cli import dose

        return dose.main(args)
    if args.command == "add-unlabeled":
        from nnunetv2_recokd.cli import unlabeled

        return unlabeled.main(args)
    if args.command == "gpu-check":
        from nnunetv2_recokd.cli import gpu_check

        return gpu_check.main(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
