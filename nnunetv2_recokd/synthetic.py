"""A small synthetic nnU-Net dataset: one organ per volume with small lesions inside it.

Made for the end-to-end test and the demo: it needs nothing downloaded, plans and trains in seconds on
a CPU, and has what distillation is for -- a large structure and small ones (label 1 organ, label 2
lesions). Lesion radius is a fraction of the volume edge; at >= 0.14 a width/4 net learns both labels
in about 80 iterations on a CPU, smaller lesions need hundreds.

With channels=2 a second, weaker channel is added (the missing-input experiments of REACT-KD): channel 0 carries
most of the signal, channel 1 shows the same anatomy at a third of the contrast under more noise. With ct=True
that channel is named "CT" (nnU-Net then plans CT normalisation for it) and written in HU-like units: 40 + 100 x
the weak channel (organ ~73, lesions ~113, noise 50 HU), so simulated low dose adds noise of a realistic size.

The same cases can be declared three ways (``labels``), the three label types nnU-Net trains: a label map ("map":
background, organ, lesion), regions ("regions": "whole" = organ and lesions, "lesion" = lesions, with
regions_class_order, as BraTS-style datasets do; the label files are the same) and an ignore label ("ignore": the
last quarter of the slices along the first axis is marked unannotated, label 3, as in partially annotated data).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import numpy as np
import SimpleITK as sitk

LABELS = {"background": 0, "organ": 1, "lesion": 2}
LABEL_KINDS = ("map", "regions", "ignore")
IGNORE = 3  # nnU-Net requires the ignore label to be the highest label value


def dataset_labels(kind: str = "map") -> dict:
    """dataset.json's "labels" (and "regions_class_order" for regions) of the given label kind."""
    if kind == "map":
        return {"labels": dict(LABELS)}
    if kind == "regions":  # region "whole" contains region "lesion": nnU-Net draws them in regions_class_order
        return {"labels": {"background": 0, "whole": [1, 2], "lesion": 2}, "regions_class_order": [1, 2]}
    if kind == "ignore":
        return {"labels": {**LABELS, "ignore": IGNORE}}
    raise ValueError(f"labels must be one of {LABEL_KINDS}, got {kind!r}")


def _organ(rng: np.random.Generator, size: int, lesion_radius: float, shift: float,
           radii: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(voxel grid (size, size, size, 3), organ mask, voxels where a lesion centre keeps the lesion inside): an
    ellipsoid centred within +-shift of the middle with semi-axes in `radii`, all as fractions of size (two draws
    from rng, in this order: make_case's random stream)."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
    centre = size / 2 + rng.uniform(-shift, shift, 3) * size
    axes = rng.uniform(*radii, 3) * size
    organ = (((grid - centre) / axes) ** 2).sum(-1) <= 1.0
    inside = np.argwhere((((grid - centre) / (axes - lesion_radius * size)) ** 2).sum(-1) <= 1.0)
    return grid, organ, inside


def make_case(rng: np.random.Generator, size: int, lesion_radius: float,
              varied: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One (image float32, label uint8) pair of shape (size, size, size).

    varied: a harder set (the demo's few-label story): every case draws its own organ and lesion intensities (the
    lesion may be brighter or darker than the organ, sometimes barely), noise level, a smooth bias field, 1-4
    lesions of 0.6-1.4x the radius, and 0-2 lesion-like blobs outside the organ that are background. A model that saw
    a few cases has seen few of these combinations. False: the original easy cases (same random stream as before
    the option existed)."""
    if varied:
        return _make_varied_case(rng, size, lesion_radius)
    grid, organ, inside = _organ(rng, size, lesion_radius, shift=0.08, radii=(0.26, 0.36))
    label = organ.astype(np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        c = inside[rng.integers(len(inside))]
        r = lesion_radius * size * rng.uniform(0.9, 1.1)
        label[((grid - c) ** 2).sum(-1) <= r * r] = 2
    image = np.where(label == 1, 1.0, 0.0) + np.where(label == 2, 2.2, 0.0)
    image = image + rng.normal(0, 0.35, image.shape) + 0.2 * np.sin(grid[..., 0] / size * 3.1)
    return image.astype(np.float32), label


def _make_varied_case(rng: np.random.Generator, size: int, lesion_radius: float) -> tuple[np.ndarray, np.ndarray]:
    grid, organ, inside = _organ(rng, size, lesion_radius, shift=0.1, radii=(0.24, 0.38))
    label = organ.astype(np.uint8)
    lesion_mask = np.zeros(label.shape, bool)
    for _ in range(int(rng.integers(1, 5))):
        c = inside[rng.integers(len(inside))]
        r = lesion_radius * size * rng.uniform(0.6, 1.4)
        lesion_mask |= ((grid - c) ** 2).sum(-1) <= r * r
    label[lesion_mask] = 2
    organ_level = rng.uniform(0.6, 1.4)
    lesion_level = organ_level + rng.choice([-1, 1]) * rng.uniform(0.5, 1.5)  # darker or brighter than the organ
    image = np.where(label == 1, organ_level, 0.0) + np.where(label == 2, lesion_level, 0.0)
    outside = np.argwhere(~organ)
    for _ in range(int(rng.integers(0, 3))):  # lesion-like blobs in the background: not lesions
        c = outside[rng.integers(len(outside))]
        r = lesion_radius * size * rng.uniform(0.6, 1.2)
        blob = (((grid - c) ** 2).sum(-1) <= r * r) & ~organ
        image[blob] = lesion_level
    axis = rng.normal(size=3)
    bias = 1 + rng.uniform(0.1, 0.4) * np.sin((grid @ (axis / np.linalg.norm(axis))) / size * rng.uniform(2, 5))
    image = image * bias + rng.normal(0, rng.uniform(0.25, 0.6), image.shape)
    return image.astype(np.float32), label


def weak_channel(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    """The second channel of a two-channel case: the label's anatomy at a third of make_case's contrast, more
    noise (noise 0.5 against contrast 0.33 and 0.73: alone it still shows the organ, the lesions barely)."""
    clean = np.where(label == 1, 1.0, 0.0) + np.where(label == 2, 2.2, 0.0)
    return (clean / 3 + rng.normal(0, 0.5, label.shape)).astype(np.float32)


def _write(array: np.ndarray, path: Path) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(path), useCompression=True)


def write_dataset(raw_root: Union[str, Path], dataset_id: int = 990, name: str = "SyntheticLesions",
                  num_train: int = 10, num_test: int = 0, size: int = 48, lesion_radius: float = 0.15,
                  seed: int = 0, channels: int = 1, ct: bool = False, labels: str = "map",
                  varied: bool = False) -> Path:
    """Write Dataset<ID>_<name> in nnU-Net's raw layout (imagesTr, labelsTr, dataset.json; imagesTs,
    labelsTs when num_test > 0) and return its folder. channels=2 adds the weak channel (_0001); one channel
    gives the same cases as before that option existed. labels: "map", "regions" or "ignore" (module docstring);
    the images are the same for every kind, and labelsTs never holds the ignore label (held-out cases are scored
    against a full annotation). varied: make_case's harder set."""
    if channels not in (1, 2):
        raise ValueError(f"channels must be 1 or 2, got {channels}")
    label_entries = dataset_labels(labels)
    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if num_test else ()):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_train + num_test):
        image, label = make_case(rng, size, lesion_radius, varied)
        split = "Tr" if i < num_train else "Ts"
        _write(image, folder / f"images{split}" / f"case_{i:03d}_0000.nii.gz")
        if channels == 2:
            weak = weak_channel(rng, label)
            _write(40 + 100 * weak if ct else weak, folder / f"images{split}" / f"case_{i:03d}_0001.nii.gz")
        if labels == "ignore" and split == "Tr":
            label = label.copy()
            label[-(size // 4):] = IGNORE
        _write(label, folder / f"labels{split}" / f"case_{i:03d}.nii.gz")
    names = {"0": "synthetic"} if channels == 1 else {"0": "main", "1": "CT" if ct else "weak"}
    dataset_json = {"channel_names": names, **label_entries, "numTraining": num_train,
                    "file_ending": ".nii.gz", "name": name,
                    "description": "synthetic organ with small lesions (nnunetv2-recokd)"}
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


def write_unlabeled_images(folder: Union[str, Path], num: int, size: int = 48, lesion_radius: float = 0.15,
                           seed: int = 1, varied: bool = False, prefix: str = "scan") -> Path:
    """num images without labels (<prefix>_NNN_0000.nii.gz, nnU-Net's naming), drawn like write_dataset's cases from
    their own random stream (seed): new scans, none of them a case of the labelled dataset."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num):
        image, _ = make_case(rng, size, lesion_radius, varied)
        _write(image, folder / f"{prefix}_{i:03d}_0000.nii.gz")
    return folder
