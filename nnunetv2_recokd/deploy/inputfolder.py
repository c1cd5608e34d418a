"""An nnU-Net input folder (``<case>_<XXXX><ending>``, one file per channel, as nnUNetv2_predict reads it): its
cases, every file name checked against the model's dataset.json before anything is predicted.

The lowest layer of deploy/ beside modelfolder.py: predict, int8 calibration (quantize.py), add-unlabeled and the
measuring commands read their cases here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Union

from nnunetv2_recokd.deploy.modelfolder import DeployError

# the file endings of nnU-Net's image readers (nnunetv2/imageio): an input file with one of these that is not the
# model's file ending is an image nnU-Net would silently leave out
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".png", ".bmp", ".tif", ".tiff",
                 ".jpg", ".jpeg")


def check_input_folder(folder: Union[str, Path], dataset_json: dict) -> list[list[str]]:
    """The cases of an nnU-Net input folder as lists of channel files, after checking every file name.

    Each case needs exactly the files ``<case>_0000<ending>`` .. ``<case>_<C-1><ending>`` for the C channels of
    dataset.json. All problems are reported at once, before anything is predicted.

    Raises:
        DeployError: missing folder, no images, files that are not named as nnU-Net expects, missing or extra
            channels.
    """
    folder = Path(folder)
    ending = dataset_json["file_ending"]
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {}))
    n_channels = len(channels)
    if not folder.is_dir():
        raise DeployError(f"input folder {folder} does not exist")
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.endswith(ending))
    if not files:
        raise DeployError(f"no {ending} files in {folder}: nnU-Net expects <case>_0000{ending}, one file per channel")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    cases: dict[str, set[int]] = {}
    problems = []
    for name in files:
        match = pattern.match(name)
        if match is None:
            problems.append(f"{name}: not named <case>_XXXX{ending} (XXXX: the 4-digit channel number)")
            continue
        cases.setdefault(match.group(1), set()).add(int(match.group(2)))
    expected = set(range(n_channels))
    names = ", ".join(f"{int(k):04d} {v}" for k, v in channels.items())
    for case, found in sorted(cases.items()):
        if found != expected:
            missing, extra = sorted(expected - found), sorted(found - expected)
            problems.append(f"{case}: " + "; ".join(
                ([f"missing channel(s) {', '.join(f'{c:04d}' for c in missing)}"] if missing else [])
                + ([f"channel(s) {', '.join(f'{c:04d}' for c in extra)} not in the model's dataset.json"]
                   if extra else [])))
    if problems:
        raise DeployError(f"input folder {folder} does not match the model's {n_channels} channel(s) ({names}):\n  "
                          + "\n  ".join(problems))
    return [[str(folder / f"{case}_{c:04d}{ending}") for c in range(n_channels)] for case in sorted(cases)]


def check_file_endings(folder: Union[str, Path], ending: str) -> None:
    """Refuse images in `folder` that end otherwise than the model's file ending.

    nnU-Net (and check_input_folder) only look at files ending with dataset.json's file_ending, so a scan saved in
    another format (``case_0000.nii`` where the model reads ``.nii.gz``) would be left out without a word. Files that
    are no image (IMAGE_ENDINGS: the endings of nnU-Net's readers) and hidden files are ignored, as before.

    Raises:
        DeployError: naming every such file, before anything is predicted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    foreign = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                     and not p.name.endswith(ending) and p.name.lower().endswith(IMAGE_ENDINGS))
    if foreign:
        raise DeployError(f"{len(foreign)} image file(s) in {folder} do not end with {ending}, the model's file ending "
                          f"(dataset.json): {', '.join(foreign[:10])}{', ...' if len(foreign) > 10 else ''}; nnU-Net "
                          f"reads one format per dataset and would leave them out: convert them to {ending}, or move "
                          f"them out of the folder")
