"""Make the few-label Hippocampus datasets of the unlabeled-scans protocol (examples/hippocampus/protocol.py).

From Dataset004_Hippocampus (208 labelled cases) and nnU-Net's own fold-0 split of it (the split the shared
teacher was trained on: generate_crossval_split over the sorted case identifiers, seed 12345):

  raw/<name>/            k labelled training cases (drawn with --seed from fold 0's training cases) plus fold 0's
                         validation cases (labelled: the held-out score), as symlinks; dataset.json
  preprocessed/<name>/splits_final.json
                         fold 0 = those k cases for training, fold 0's validation cases for validation
  <unlabeled folder>     images only (no labels) of the cases chosen with --unlabeled: "train-rest" takes fold 0's
                         other training cases (the teacher was trained on them), "val-half" takes half of fold 0's
                         validation cases, which the teacher never saw; the other half then stays as validation

Usage:
  python few_labels.py SOURCE_RAW_DATASET NNUNET_RAW NNUNET_PREPROCESSED DATASET_NAME UNLABELED_FOLDER
         [--k 20] [--seed 0] [--unlabeled train-rest|val-half|none]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from nnunetv2.utilities.crossval_split import generate_crossval_split


def case_ids(raw: Path, ending: str) -> list[str]:
    return sorted(f.name[:-len(ending)] for f in (raw / "labelsTr").iterdir() if f.name.endswith(ending))


def link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(source.resolve())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path)
    p.add_argument("nnunet_raw", type=Path)
    p.add_argument("nnunet_preprocessed", type=Path)
    p.add_argument("name")
    p.add_argument("unlabeled", type=Path)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unlabeled-cases", choices=["train-rest", "val-half", "none"], default="train-rest")
    a = p.parse_args(argv)

    dataset = json.loads((a.source / "dataset.json").read_text())
    ending = dataset["file_ending"]
    fold0 = generate_crossval_split(case_ids(a.source, ending), seed=12345, n_splits=5)[0]
    train, val = sorted(fold0["train"]), sorted(fold0["val"])
    labelled = sorted(random.Random(a.seed).sample(train, a.k))
    if a.unlabeled_cases == "train-rest":
        unlabeled = [c for c in train if c not in labelled]
    elif a.unlabeled_cases == "val-half":
        unlabeled = sorted(random.Random(a.seed).sample(val, len(val) // 2))
        val = [c for c in val if c not in unlabeled]
    else:
        unlabeled = []

    out = a.nnunet_raw / a.name
    n_channels = len(dataset["channel_names"])
    for case in labelled + val:
        for c in range(n_channels):
            link(a.source / "imagesTr" / f"{case}_{c:04d}{ending}", out / "imagesTr" / f"{case}_{c:04d}{ending}")
        link(a.source / "labelsTr" / f"{case}{ending}", out / "labelsTr" / f"{case}{ending}")
    for case in unlabeled:
        for c in range(n_channels):
            link(a.source / "imagesTr" / f"{case}_{c:04d}{ending}", a.unlabeled / f"{case}_{c:04d}{ending}")
    (out / "dataset.json").write_text(json.dumps(
        {**dataset, "numTraining": len(labelled) + len(val),
         "description": f"{a.k} labelled cases of fold 0's training split of {a.source.name} (seed {a.seed}) "
                        f"plus fold 0's {len(val)} validation cases"}, indent=1))
    splits = a.nnunet_preprocessed / a.name / "splits_final.json"
    splits.parent.mkdir(parents=True, exist_ok=True)
    splits.write_text(json.dumps([{"train": labelled, "val": val}], indent=1))
    print(f"{out}: {len(labelled)} labelled training cases, {len(val)} validation cases; {len(unlabeled)} unlabeled "
          f"cases ({a.unlabeled_cases}) in {a.unlabeled}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
