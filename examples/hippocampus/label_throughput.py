"""How fast the teacher labels unlabeled scans on this machine (issue #36, item 1): scans per minute of
`add-unlabeled`'s labelling step, OpenVINO vs PyTorch, mirroring on vs off, one process.

    python examples/hippocampus/label_throughput.py TEACHER_MODEL_FOLDER UNLABELED_IMAGES --cases 12 \
        [--threads 2] [--json out.json]

Labels the first --cases images of the folder (sorted) into a temporary folder once per setting, with the same code
add-unlabeled runs (nnunetv2_recokd.unlabeled.label_cases: nnU-Net's preprocessing, sliding window and export).
Scans per minute are the steady state, from the first finished case to the last; the teacher's loading, OpenVINO's
compilation and the first case are the time to the first case. nnUNet_raw and
nnUNet_preprocessed must be set (any folders: nothing is written there).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("teacher")
    parser.add_argument("images", type=Path)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from nnunetv2_recokd.unlabeled import check_inputs, label_cases

    picked = Path(tempfile.mkdtemp()) / "images"
    picked.mkdir()
    for f in sorted(args.images.iterdir())[:args.cases]:
        (picked / f.name).symlink_to(f.resolve())
    rows = []
    for runtime in ("openvino", "torch"):
        for tta in (True, False):
            inputs = check_inputs(args.teacher, picked, 999, "Throughput", tta=tta)
            out = Path(tempfile.mkdtemp()) / "labels"
            lines: list[str] = []
            start = time.perf_counter()
            n = label_cases(inputs, out, "cpu", lambda m: lines.append((time.perf_counter(), m)), args.threads,
                            runtime=runtime)
            total = time.perf_counter() - start
            # steady state: from the first finished case to the last (loading, compiling and the first case apart)
            case_times = [t for t, m in lines if m.startswith("[")]
            steady = case_times[-1] - case_times[0]
            rows.append({"runtime": runtime, "mirroring": tta, "cases": n, "seconds_total": round(total, 1),
                         "seconds_to_first_case": round(case_times[0] - start, 1),
                         "scans_per_minute": round(60 * (n - 1) / steady, 1)})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out.parent, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"teacher": args.teacher, "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
