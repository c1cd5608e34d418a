"""`nnunetv2_recokd demo`: the whole protocol on a synthetic dataset (or --dataset) with nnU-Net's own commands; the
protocol itself is nnunetv2_recokd/demo.py."""

from __future__ import annotations

import argparse

from nnunetv2_recokd.cli.common import cuda_available


def add_parsers(sub) -> None:
    from nnunetv2_recokd.demo import FEW_LABELS, STUDENT_EPOCHS, TEACHER_EPOCHS, UNLABELED

    p = sub.add_parser("demo", help="the whole protocol on a synthetic dataset (or --dataset): plan, train the "
                                    "teacher, a control on 2 labelled cases and students on those 2 + 12 scans the "
                                    "teacher labels (--few-labels 0: all labels), predict, evaluate, table and figure")
    p.add_argument("--out", default="recokd_demo", help="output folder (table.md, table.json, figure.png, logs)")
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dataset", help="run on this existing nnU-Net dataset (name or ID) instead of synthetic data")
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help=f"default {TEACHER_EPOCHS[True]} (--few-labels story), "
                        f"{TEACHER_EPOCHS[False]} (--few-labels 0 or --dataset)")
    p.add_argument("--student-epochs", type=int, default=None,
                   help=f"default {STUDENT_EPOCHS[True]} (--few-labels story), "
                        f"{STUDENT_EPOCHS[False]} (--few-labels 0 or --dataset)")
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
                        f"{FEW_LABELS}): the teacher trains on the labelled cases and labels --unlabeled "
                        "new scans; students train on K labelled cases alone (the control) and on those K + the "
                        "teacher-labelled scans. 0: the easy set, every model on all labels (the default with "
                        "--dataset)")
    p.add_argument("--unlabeled", type=int, default=UNLABELED, metavar="M",
                   help="new scans the teacher labels (--few-labels)")
    p.add_argument("--ensemble", type=int, default=0, metavar="N",
                   help="also train the teacher's folds 1..N-1, distil the N folds into one student "
                        "(nnUNetTrainerLogitKD_ensemble) and add a table on the held-out cases: fold ensemble + TTA "
                        "vs one fold + TTA vs the student, Dice per class and seconds per case (0: off; 2-3 on a CPU)")


def main(args: argparse.Namespace) -> int:
    from nnunetv2_recokd import demo

    return demo.run(args.out, args.device, args.dataset, args.teacher_epochs, args.student_epochs, args.iterations,
                    args.num_train, args.num_test, args.seed, args.seeds, args.results, args.warmup,
                    ensemble=args.ensemble, few_labels=args.few_labels, unlabeled=args.unlabeled)
