"""`nnunetv2_recokd` command line: install, ext-path, doctor, the demo/benchmark/report jobs, export/predict for
deployment, and gpu-check (the GPU checks in one run).

Each command module parses its own arguments (add_parser / add_parsers) and calls library functions (main); this
dispatcher imports a command module only when it builds the parser or runs that command, and no command module
imports another (tests/test_structure.py)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# command modules in the order their subcommands are listed; plugin: install, ext-path, doctor; deploy: export,
# predict, student-inputs
MODULES = ("plugin", "demo", "benchmark", "report", "deploy", "predict_benchmark", "dose", "gpu_check", "unlabeled")
# subcommand -> (command module, its function that runs it)
COMMANDS = {
    "install": ("plugin", "install_main"),
    "ext-path": ("plugin", "ext_path_main"),
    "doctor": ("plugin", "doctor_main"),
    "demo": ("demo", "main"),
    "benchmark": ("benchmark", "main"),
    "report": ("report", "main"),
    "export": ("deploy", "export_main"),
    "predict": ("deploy", "predict_main"),
    "student-inputs": ("deploy", "student_inputs_main"),
    "benchmark-predict": ("predict_benchmark", "main"),
    "evaluate-dose": ("dose", "main"),
    "add-unlabeled": ("unlabeled", "main"),
    "gpu-check": ("gpu_check", "main"),
}


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunetv2_recokd",
                                     description="Knowledge distillation trainers for nnU-Net v2")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in MODULES:
        _module(name).add_parsers(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    module, function = COMMANDS[args.command]
    return getattr(_module(module), function)(args)


if __name__ == "__main__":
    sys.exit(main())
