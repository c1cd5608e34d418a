"""`nnunetv2_recokd benchmark-predict`: seconds per case of full prediction, teacher vs student, as users run it;
the benchmark itself is nnunetv2_recokd/evaluation/predict_benchmark.py."""

from __future__ import annotations

from pathlib import Path

TTA_CHOICES = ("on", "off")


def main(args) -> int:
    from nnunetv2_recokd.evaluation import predict_benchmark

    out = Path(args.out)
    if args.workload == "large":
        teacher, student, images = predict_benchmark.make_large_workload(out / "large_workload", args.large_cases,
                                                                         num_folds=args.large_folds)
        tta = args.tta or ["off"]
    else:
        if not (args.teacher and args.student and args.i):
            raise SystemExit("--workload folders needs --teacher, --student and -i")
        teacher, student, images = Path(args.teacher), Path(args.student), Path(args.i)
        tta = args.tta or list(TTA_CHOICES)
    result = predict_benchmark.run(
        teacher, student, images, out, args.runtimes, tta, args.f, Path(args.labels) if args.labels else None,
        args.patch_runs, args.parity_cases, args.workload, (args.teacher_chk, args.student_chk),
        args.patch_runtimes, args.patch_plain_graph, args.precisions,
        Path(args.calibration) if args.calibration else (images if args.workload == "large" else None))
    print(predict_benchmark.write_outputs(result, out))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("benchmark-predict", help="seconds per case of full prediction, teacher vs student, stock "
                                                 "nnUNetv2_predict vs our predict with a CPU runtime")
    p.add_argument("--workload", choices=("folders", "large"), default="folders")
    p.add_argument("--teacher", help="teacher model folder (workload folders)")
    p.add_argument("--student", help="student model folder (workload folders)")
    p.add_argument("-i", help="input images (workload folders)")
    p.add_argument("--teacher-chk", default="checkpoint_final.pth", help="teacher checkpoint file name")
    p.add_argument("--student-chk", default="checkpoint_final.pth", help="student checkpoint file name")
    p.add_argument("--labels", help="reference labels for Dice (optional)")
    p.add_argument("-f", nargs="+", help="folds (default: every fold with checkpoint_final.pth; several folds are the "
                                         "ensemble)")
    p.add_argument("--runtimes", nargs="+", default=["openvino"], help="runtimes of our predict (default openvino)")
    p.add_argument("--patch-runtimes", nargs="+",
                   help="runtimes timed per patch (default: --runtimes; e.g. openvino onnxruntime to compare them)")
    p.add_argument("--patch-plain-graph", action="store_true",
                   help="also time each patch runtime on the plain ONNX export (no skip-concatenation rewrite)")
    p.add_argument("--precisions", nargs="+", choices=("f32", "bf16", "int8"), default=["f32"],
                   help="OpenVINO precisions of the student's rows and patch timings (default f32; e.g. f32 int8)")
    p.add_argument("--calibration", help="int8: images to calibrate on (default: each fold's own training images; "
                                         "the large workload: its own volume)")
    p.add_argument("--tta", nargs="+", choices=TTA_CHOICES,
                   help="TTA settings (default: on and off for folders, off for large)")
    p.add_argument("--large-cases", type=int, default=1, help="volumes of the large workload")
    p.add_argument("--large-folds", type=int, default=1,
                   help="random-weight folds per model of the large workload (with -f 0 1 ...: the fold ensemble)")
    p.add_argument("--patch-runs", type=int, default=5, help="timed forwards per patch latency (median)")
    p.add_argument("--parity-cases", type=int, default=2, help="whole cases for the student's logit parity")
    p.add_argument("--out", default="recokd_benchmark_predict", help="output folder (tables, JSON, predictions)")
