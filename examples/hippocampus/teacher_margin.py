"""The teacher's logit margins on its training cases: the m of the oracle run (issue #35, item 1).

For every voxel of the given cases (preprocessed, the teacher's own sliding window, no mirroring): the margin of the
labelled class, z_label - max_{c != label} z_c, summarised per label (median, mean, quartiles). The oracle setting
`logit_oracle_margin` replaces the teacher's logits by m * onehot(label); m near the teacher's background margin
makes the oracle as confident as the teacher where most voxels are.

    python examples/hippocampus/teacher_margin.py TEACHER_MODEL_FOLDER PREPROCESSED_DATASET [--fold 0]
        [--cases 10] [--json out.json]

Cases: the first --cases of the fold's training cases in PREPROCESSED_DATASET/splits_final.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch


def margins(logits: torch.Tensor, labels: torch.Tensor) -> dict[int, np.ndarray]:
    """{label: margins of the voxels with that label}, logits (C, *spatial), labels (*spatial) integer; voxels labelled
    outside 0..C-1 (nnU-Net's -1 outside the crop's nonzero region) are left out."""
    c = logits.shape[0]
    flat, lab = logits.reshape(c, -1), labels.reshape(-1).long()
    inside = (lab >= 0) & (lab < c)
    flat, lab = flat[:, inside], lab[inside]
    own = flat.gather(0, lab[None]).squeeze(0)
    others = flat.scatter(0, lab[None], float("-inf")).amax(0)
    return {int(k): (own - others)[lab == k].numpy() for k in lab.unique()}


def summary(values: np.ndarray) -> dict[str, float]:
    q = np.percentile(values, [25, 50, 75])
    return {"voxels": int(values.size), "mean": float(values.mean()), "q25": float(q[0]), "median": float(q[1]),
            "q75": float(q[2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("teacher")
    parser.add_argument("preprocessed")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(args.teacher, (args.fold,), "checkpoint_final.pth")
    folder = Path(args.preprocessed)
    cases = json.loads((folder / "splits_final.json").read_text())[args.fold]["train"][:args.cases]
    data_folder = folder / "nnUNetPlans_3d_fullres"
    dataset = infer_dataset_class(str(data_folder))(str(data_folder), cases)
    per_label: dict[int, list[np.ndarray]] = {}
    for case in cases:
        data, seg, _, _ = dataset.load_case(case)
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(np.asarray(data)).float())
        for label, values in margins(logits.float().cpu(), torch.from_numpy(np.asarray(seg)[0])).items():
            per_label.setdefault(label, []).append(values)
    result = {"teacher": args.teacher, "cases": cases,
              "margin_per_label": {str(k): summary(np.concatenate(v)) for k, v in sorted(per_label.items())}}
    print(json.dumps(result["margin_per_label"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
