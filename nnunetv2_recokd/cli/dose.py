"""`nnunetv2_recokd evaluate-dose`: Dice per class of a model on held-out cases at several simulated CT doses; the
evaluation itself is nnunetv2_recokd/evaluation/dose.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnunetv2_recokd.cli.common import add_model_arguments, cuda_available, resolve_model

DEFAULT_DOSES = (1.0, 0.5, 0.25, 0.1)


def add_parsers(sub) -> None:
    from nnunetv2_recokd.inputs import lowdose

    p = sub.add_parser("evaluate-dose", help="Dice per class of a model on held-out cases at several simulated CT "
                                             "doses (REACT-KD's robustness table)")
    p.add_argument("-i", required=True, help="held-out images in HU (<case>_0000<ending>, as for nnUNetv2_predict)")
    p.add_argument("-l", "--labels", required=True, help="reference labels (<case><ending>)")
    p.add_argument("-o", "--out", required=True, help="output folder (predictions per dose, dose_table.md/.json)")
    add_model_arguments(p)
    p.add_argument("--doses", nargs="+", type=float, default=list(DEFAULT_DOSES),
                   help="dose fractions in (0, 1] relative to the scans (default: 1.0 0.5 0.25 0.1)")
    p.add_argument("--channels", nargs="+", type=int,
                   help="input channels holding CT in HU (default: those the model's plans normalise with "
                        "CTNormalization)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated noise (default 0)")
    p.add_argument("-device", default="cuda" if cuda_available() else "cpu", choices=["cpu", "cuda"],
                   help="device of the simulation and the prediction")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring (test-time augmentation)")
    p.add_argument("--keep-images", action="store_true", help="keep the degraded inputs in OUT/images_dose_<d>/")
    p.add_argument("--i0", type=float, default=lowdose.DEFAULT_I0,
                   help=f"incident photons per 1 mm x 1 mm reading at full dose (default {lowdose.DEFAULT_I0:g})")
    p.add_argument("--electronic-noise", type=float, default=lowdose.DEFAULT_ELECTRONIC_NOISE,
                   help=f"electronic noise std per reading in counts (default {lowdose.DEFAULT_ELECTRONIC_NOISE:.3g};"
                        f" 0: none)")
    p.add_argument("--n-angles", type=int, help="views over 180 degrees (default: the slice side in pixels)")
    p.add_argument("--window", choices=lowdose.WINDOWS, default=lowdose.DEFAULT_WINDOW,
                   help=f"ramp filter window of the reconstruction (default {lowdose.DEFAULT_WINDOW})")


def main(args: argparse.Namespace) -> int:
    from nnunetv2_recokd.deploy.modelfolder import DeployError
    from nnunetv2_recokd.evaluation.dose import evaluate
    from nnunetv2_recokd.evaluation.tables import dose_table

    settings = {"i0": args.i0, "electronic_noise": args.electronic_noise, "n_angles": args.n_angles,
                "window": args.window}
    try:
        model = resolve_model(args)
        out = Path(args.out)
        result = evaluate(model, Path(args.i), Path(args.labels), out, args.doses, args.channels, args.seed,
                          args.device, not args.disable_tta, args.step_size, args.keep_images, settings)
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(dose_table(result))
    print(f"written: {out / 'dose_table.md'}, {out / 'dose_table.json'}")
    return 0
