"""`nnunetv2_recokd` command line: install, ext-path, doctor (and the demo/benchmark/report jobs)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from nnunetv2_recokd.cli import plugin


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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "install":
        return plugin.install(uninstall=args.uninstall)
    if args.command == "ext-path":
        return plugin.print_ext_path()
    if args.command == "doctor":
        return plugin.doctor(args.dataset, args.configuration, args.fold, args.trainer, args.plans)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
