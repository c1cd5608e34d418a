"""Are the teacher's labels wrong where its mirrorings disagree? Measured on cases with real labels it never saw.

The teacher labels each image one mirroring at a time (nnunetv2_recokd/agreement.py, as add-unlabeled
--min-agreement does); its label (the average of the mirrorings, nnU-Net's prediction) is compared with the real one,
and for each threshold t the voxels where fewer than t of the mirrorings agree ("unsure") are counted:

  ignored_fg_share   share of the teacher's foreground voxels that would get the ignore label
  errors_caught      share of the teacher's wrong voxels that would get the ignore label
  error_rate_unsure  how often the teacher is wrong on unsure voxels (error_rate_sure: on the others)
  dice_sure          the teacher's mean foreground Dice counted on sure voxels only (dice: on all)

    python examples/hippocampus/agreement_check.py TEACHER IMAGES LABELS OUT.json [--thresholds 1 0.875 0.75]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="the teacher's model folder")
    parser.add_argument("images", help="folder of images with real labels the teacher never saw")
    parser.add_argument("labels", help="folder of their real labels")
    parser.add_argument("out", help="JSON file of the per-threshold totals")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 0.875, 0.75, 0.625])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from nnunetv2_recokd.agreement import predict_with_agreement, segmentation_in_image, unsure_in_image
    from nnunetv2_recokd.deploy.modelfolder import open_model_folder
    from nnunetv2_recokd.deploy.inputfolder import check_input_folder
    from nnunetv2_recokd.deploy.predictor import build_predictor, dice_per_class

    model = open_model_folder(args.teacher, None)
    predictor = build_predictor(model, "openvino", True, 0.5, threads=args.threads)
    ending = model.dataset_json["file_ending"]
    foreground = [int(v) for k, v in model.dataset_json["labels"].items() if k not in ("background", "ignore")]
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    keys = ("fg", "ignored_fg", "errors", "caught", "unsure", "sure")
    totals = {t: dict.fromkeys(keys, 0) for t in args.thresholds}
    dice_all, dice_sure = [], {t: [] for t in args.thresholds}
    cases = check_input_folder(args.images, model.dataset_json)
    start = time.perf_counter()
    for i, files in enumerate(cases, 1):
        case = Path(files[0]).name[: -len(ending) - 5]
        data, _, properties = preprocessor.run_case(files, None, predictor.plans_manager,
                                                    predictor.configuration_manager, predictor.dataset_json)
        logits, agreement = predict_with_agreement(predictor, torch.from_numpy(data))
        label = segmentation_in_image(logits, properties, predictor)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(args.labels) / f"{case}{ending}")))
        wrong = label != truth
        dice_all.append(np.mean(list(dice_per_class(label, truth, foreground).values())))
        for t in args.thresholds:
            unsure = unsure_in_image(agreement, t, properties, predictor)
            n = totals[t]
            n["fg"] += int((label > 0).sum())
            n["ignored_fg"] += int((unsure & (label > 0)).sum())
            n["errors"] += int(wrong.sum())
            n["caught"] += int((wrong & unsure).sum())
            n["unsure"] += int(unsure.sum())
            n["sure"] += int((~unsure).sum())
            sure = ~unsure
            dice_sure[t].append(np.mean(list(dice_per_class(label[sure], truth[sure], foreground).values())))
        print(f"[{i}/{len(cases)}] {case}: Dice {dice_all[-1]:.4f}, "
              f"{time.perf_counter() - start:.0f} s so far", flush=True)
    rows = []
    for t, n in totals.items():
        sure_errors = n["errors"] - n["caught"]
        rows.append({"min_agreement": t, "ignored_fg_share": n["ignored_fg"] / n["fg"],
                     "errors_caught": n["caught"] / max(n["errors"], 1),
                     "error_rate_unsure": n["caught"] / max(n["unsure"], 1),
                     "error_rate_sure": sure_errors / max(n["sure"], 1),
                     "dice": float(np.mean(dice_all)), "dice_sure": float(np.mean(dice_sure[t])), **n})
    result = {"teacher": str(model.path), "cases": len(cases), "mirrorings": 2 ** len(predictor.allowed_mirroring_axes),
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"t {r['min_agreement']:.3f}: ignores {100 * r['ignored_fg_share']:.1f}% of the teacher's foreground, "
              f"catches {100 * r['errors_caught']:.1f}% of its errors; error rate unsure "
              f"{100 * r['error_rate_unsure']:.1f}% vs sure {100 * r['error_rate_sure']:.2f}%; "
              f"Dice {r['dice']:.4f} (sure voxels only {r['dice_sure']:.4f})")


if __name__ == "__main__":
    main()
