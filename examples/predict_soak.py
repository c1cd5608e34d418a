"""Memory soak of `nnunetv2_recokd predict`: one command over many small cases, its resident set sampled per case.

Makes a tiny random student model folder (sandbox.write_random_student) and N synthetic images of varied sizes
(synthetic.make_case, 20^3 .. 28^3 voxels, nnU-Net's naming), runs `nnunetv2_recokd predict` on them in a
subprocess and records the command's resident set size (RSS) each time it logs a finished case. Writes
<results>.json (every sample, the command, the machine) and <results>.md (RSS at case 10 and at the last case, the
growth between them).

    nice -n 10 python examples/predict_soak.py [--cases 300] [--results docs/results/predict_soak_cpu]

The case count, sizes and threads are arguments; the defaults made docs/results/predict_soak_cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def make_inputs(root: Path, cases: int, sizes: list[int], seed: int = 0) -> tuple[Path, Path]:
    """(model folder, image folder) under root: the deploy tests' tiny student (patch 16^3, fold 0, random weights)
    and `cases` images, case i of size sizes[i % len(sizes)]."""
    import SimpleITK as sitk

    from nnunetv2_recokd import sandbox
    from nnunetv2_recokd.synthetic import make_case

    model = sandbox.write_random_student(root / "nnUNetTrainerReCoKD__nnUNetPlans__3d_fullres",
                                         sandbox.unet_plans((16, 32, 64), (16, 16, 16)), sandbox.dataset_json())
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(cases):
        image, _ = make_case(rng, sizes[i % len(sizes)], 0.15)
        sitk.WriteImage(sitk.GetImageFromArray(image), str(images / f"case_{i:03d}_0000.nii.gz"))
    return model, images


def rss_and_peak(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes, from /proc/<pid>/status (0, 0 once it is gone)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
    except OSError:
        return 0, 0
    return tuple(int(fields.get(k, "0 kB").split()[0]) * 1024 for k in ("VmRSS", "VmHWM"))


def soak(command: list[str], env: dict) -> dict:
    """Run the command; sample its RSS at every logged case ("<case>: <s> s (preprocess ...") and every 0.5 s."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    per_case, timed, lines = [], [], []
    done = threading.Event()

    def sample_every_half_second() -> None:
        while not done.wait(0.5):
            rss, _ = rss_and_peak(process.pid)
            if rss:
                timed.append({"t_s": round(time.perf_counter() - start, 2), "rss_bytes": rss})
    sampler = threading.Thread(target=sample_every_half_second, daemon=True)
    sampler.start()
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if " s (preprocess " in line:
            rss, peak = rss_and_peak(process.pid)
            per_case.append({"case": len(per_case) + 1, "name": line.split(":", 1)[0], "rss_bytes": rss,
                             "peak_rss_bytes": peak, "t_s": round(time.perf_counter() - start, 2)})
    stderr = process.stderr.read()
    code = process.wait()
    done.set()
    sampler.join()
    return {"returncode": code, "wall_s": time.perf_counter() - start, "per_case": per_case, "timed": timed,
            "stdout_head": lines[:3], "stdout_tail": lines[-3:], "stderr_tail": stderr[-2000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 22, 24, 26, 28],
                        help="image edge lengths, cycled over the cases (default 20 22 24 26 28)")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads of the command (default 1)")
    parser.add_argument("--first", type=int, default=10, help="the case growth is measured from (default 10)")
    parser.add_argument("--results", default="docs/results/predict_soak_cpu", help="writes <results>.json / .md")
    parser.add_argument("--keep", help="make the inputs and outputs in this folder and keep them (default: a "
                                       "temporary folder, removed)")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="recokd_soak_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        model, images = make_inputs(root, args.cases, args.sizes)
        exe = shutil.which("nnunetv2_recokd")
        command = ([exe] if exe else [sys.executable, "-m", "nnunetv2_recokd.cli"]) + [
            "predict", "-i", str(images), "-o", str(root / "pred"), "-m", str(model), "-f", "0",
            "--threads", str(args.threads)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RECOKD_CACHE": str(root / "cache")}
        result = soak(command, env)
        written = len(list((root / "pred").glob("case_*.nii.gz")))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    per_case = result["per_case"]
    if result["returncode"] != 0 or len(per_case) != args.cases or written != args.cases:
        sys.exit(f"the command failed or did not predict every case (exit {result['returncode']}, {len(per_case)} "
                 f"logged, {written} written):\n{result['stderr_tail']}")
    mib = 1024 ** 2
    first, last = per_case[args.first - 1]["rss_bytes"], per_case[-1]["rss_bytes"]
    later = np.array([c["rss_bytes"] for c in per_case[args.first - 1:]], dtype=float)
    slope = float(np.polyfit(np.arange(len(later)), later, 1)[0])  # bytes per case, least squares
    import openvino
    import torch

    import nnunetv2_recokd

    summary = {
        "cases": args.cases, "sizes": args.sizes, "threads": args.threads,
        "rss_at_case_mib": {str(args.first): first / mib, str(args.cases): last / mib},
        "growth_mib": (last - first) / mib, "growth_kib_per_case_fit": slope / 1024,
        "max_rss_after_first_mib": float(later.max()) / mib, "peak_rss_mib": per_case[-1]["peak_rss_bytes"] / mib,
        "wall_s": result["wall_s"]}
    record = {
        "made_by": " ".join(["nice -n 10 python examples/predict_soak.py", *map(shlex.quote, sys.argv[1:])]),
        "predict_command": " ".join(["nnunetv2_recokd"] + [shlex.quote(a) for a in command[command.index("predict"):]]
                                    ).replace(str(root), "$WORK"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "openvino": openvino.__version__, "nnunetv2_recokd": getattr(nnunetv2_recokd, "__version__", "")},
        "summary": summary, "per_case": per_case, "every_half_second": result["timed"]}
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    checkpoints = sorted({1, args.first, 50, 100, 150, 200, 250, args.cases} & set(range(1, args.cases + 1)))
    rows = "\n".join(f"| {n} | {per_case[n - 1]['rss_bytes'] / mib:.1f} |" for n in checkpoints)
    out.with_suffix(".md").write_text(
        f"# `nnunetv2_recokd predict` memory over {args.cases} cases in one command\n\n"
        f"Made by `{record['made_by']}` ({record['machine']['cores']} cores, torch {torch.__version__}, OpenVINO "
        f"{openvino.__version__}); raw samples in [{out.with_suffix('.json').name}]({out.with_suffix('.json').name})."
        f"\n\nThe command: `{record['predict_command']}` on {args.cases} synthetic images of "
        f"{'/'.join(map(str, args.sizes))} voxels per edge (cycled), a random width-1/4 student with patch 16^3, TTA "
        f"on; resident set (VmRSS) read from /proc when the command logs each finished case.\n\n"
        f"| after case | RSS MiB |\n|---|---|\n{rows}\n\n"
        f"RSS at case {args.first}: {first / mib:.1f} MiB, at case {args.cases}: {last / mib:.1f} MiB, growth "
        f"{(last - first) / mib:+.1f} MiB ({slope / 1024:+.1f} KiB per case, least-squares slope over cases "
        f"{args.first}-{args.cases}); peak {summary['peak_rss_mib']:.1f} MiB; {result['wall_s']:.0f} s in all.\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
