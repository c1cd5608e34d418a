"""`nnunetv2_recokd gpu-check`: what only a GPU can show, in one command and one JSON file (examples/gpu_check.sh);
the parts and their child processes are nnunetv2_recokd/evaluation/gpu_check.py."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser("gpu-check", help="the GPU checks in one run (benchmark of every trainer, 1/2/5 teachers, "
                                         "low-dose steps under autocast, a short real training), one JSON")
    p.add_argument("--json", help="output file (default: $OUT/gpu_check.json when OUT is set, else "
                                  "./gpu_check.json)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default); cpu rehearses every part, reporting the CUDA-only figures as skipped")
    p.add_argument("--quick", action="store_true", help="tiny plans, 1-2 steps per part (a rehearsal, minutes on "
                                                        "a CPU)")
    p.add_argument("--parts", nargs="+", help="only these parts (names as in the JSON, e.g. lowdose training; "
                                              "benchmark runs every benchmark/<setting>)")
    p.add_argument("--budget", type=int, help="seconds for all parts together (default: 440, --quick 900); a part "
                                              "gets its own limit or what is left, whichever is less")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (logs, nnU-Net folders)")
    # internal: the parent runs each part as `gpu-check --part NAME --part-out FILE --work DIR` in a child process
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--part-out", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    from nnunetv2_recokd.evaluation.gpu_check import run_all, run_part, schedule_for

    schedule = schedule_for(args.quick)
    if args.part:
        return run_part(args.part, args.device, schedule, Path(args.part_out), Path(args.work))
    out = Path(args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                             else "gpu_check.json"))
    parts = schedule.parts()
    if args.parts:
        unknown = [p for p in args.parts if p not in parts and not any(q.startswith(p + "/") for q in parts)]
        if unknown:
            raise SystemExit(f"unknown --parts {', '.join(unknown)}; this schedule has {', '.join(parts)}")
        parts = [q for q in parts if q in args.parts or q.split("/")[0] in args.parts]
    return run_all(out, args.device, args.quick, parts, args.budget or schedule.budget, args.keep_work)
