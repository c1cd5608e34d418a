"""The student's input channels: a subset of the dataset's, e.g. CT only from a PET/CT dataset (REACT-KD).

The teacher reads every channel of the preprocessed data; the student reads `student_channels` only. nnU-Net
preprocesses (and normalises) each channel on its own, so the student's channels are a plain slice of the
preprocessed array, and the student's model folder describes only those channels: its dataset.json lists them
renumbered from 0 in the order given, its plans.json keeps their normalisation schemes and intensity properties.
Stock nnUNetv2_predict then asks for exactly those files per case: the student's channel i is read from
``<case>_<i:04d><file_ending>`` (``student_input_files`` makes such a folder from the dataset's files).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

# where a student's dataset.json records which dataset channel each of its channels is (nnU-Net ignores the key)
DATASET_KEY = "recokd_student_channels"


class ChannelError(ValueError):
    """A student_channels setting that does not name channels of the dataset."""


def dataset_channel_names(dataset_json: dict[str, Any]) -> list[str]:
    """Channel names in channel order (dataset.json's channel_names, or the older "modality")."""
    names = dataset_json.get("channel_names", dataset_json.get("modality")) or {}
    return [str(names[k]) for k in sorted(names, key=int)]


def resolve_student_channels(setting: Optional[Sequence[Union[int, str]]],
                             dataset_json: dict[str, Any]) -> Optional[list[int]]:
    """Dataset channel indices the student reads, in its order; None when it reads every channel as they are.

    Args:
        setting: None (every channel), or channels given by index (0, 1) or by name ("CT", as in dataset.json).

    Raises:
        ChannelError: an unknown name or index, a repeated channel, or an empty list.
    """
    if setting is None:
        return None
    names = dataset_channel_names(dataset_json)
    listing = ", ".join(f"{i} ({n})" for i, n in enumerate(names))
    if not setting:
        raise ChannelError(f"student_channels is empty; give the channels the student reads ({listing}) or null")
    indices = []
    for item in setting:
        if isinstance(item, int) and 0 <= item < len(names):
            indices.append(item)
        elif isinstance(item, str) and names.count(item) == 1:
            indices.append(names.index(item))
        else:
            raise ChannelError(f"student_channels: {item!r} is not a channel of this dataset; its channels are "
                               f"{listing} (give indices or names)")
    if len(set(indices)) != len(indices):
        raise ChannelError(f"student_channels {list(setting)} names a channel twice; channels: {listing}")
    if indices == list(range(len(names))):
        return None
    return indices


def student_dataset_json(dataset_json: dict[str, Any], channels: Sequence[int]) -> dict[str, Any]:
    """dataset.json for the student: its channels renumbered from 0, and which dataset channel each one is."""
    names = dataset_channel_names(dataset_json)
    out = copy.deepcopy(dataset_json)
    out.pop("modality", None)
    out["channel_names"] = {str(i): names[c] for i, c in enumerate(channels)}
    out[DATASET_KEY] = {str(i): {"dataset_channel": c, "name": names[c]} for i, c in enumerate(channels)}
    return out


def student_plans(plans: dict[str, Any], channels: Sequence[int]) -> dict[str, Any]:
    """plans.json for the student: per-channel normalisation (every configuration) and intensity properties of its
    channels only, renumbered from 0. The original plans are not changed."""
    out = copy.deepcopy(plans)
    for configuration in out.get("configurations", {}).values():
        for key in ("normalization_schemes", "use_mask_for_norm"):
            if key in configuration:  # configurations that inherit_from another may not list them
                configuration[key] = [configuration[key][c] for c in channels]
    properties = out.get("foreground_intensity_properties_per_channel")
    if properties is not None:
        out["foreground_intensity_properties_per_channel"] = {str(i): properties[str(c)]
                                                             for i, c in enumerate(channels)}
    return out


def blank_values(normalization_schemes: Sequence[str], intensity_properties: dict[str, Any],
                 channels: Sequence[int]) -> list[float]:
    """The value a blank scan (every voxel 0 in the raw file) has after nnU-Net's normalisation, per channel.

    nnU-Net's own normalisation classes compute it: 0 for z-score (a constant image has mean 0 and no spread),
    (clip(0) - mean) / std for CT with the dataset's foreground statistics, 0 for the rescaling schemes.
    """
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    values = []
    for c in channels:  # the class lookup of nnU-Net's preprocessor (DefaultPreprocessor._normalize)
        scheme = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "preprocessing", "normalization"),
                                             normalization_schemes[c], "nnunetv2.preprocessing.normalization")
        if scheme is None:
            raise ChannelError(f"normalisation scheme {normalization_schemes[c]!r} of channel {c} not found in nnU-Net")
        normaliser = scheme(use_mask_for_norm=False, intensityproperties=intensity_properties.get(str(c), {}))
        values.append(float(normaliser.run(np.zeros((1, 1, 1), dtype=np.float32))[0, 0, 0]))
    return values


def student_channel_order(student_dataset: dict[str, Any]) -> Optional[list[int]]:
    """The dataset channel each of the student's channels is, in the student's order (its channel i reads dataset
    channel ``result[i]``); None when the dataset.json is not a student's that reads a subset (no DATASET_KEY)."""
    mapping = student_dataset.get(DATASET_KEY)
    if not mapping:
        return None
    return [int(entry["dataset_channel"]) for _, entry in sorted(mapping.items(), key=lambda kv: int(kv[0]))]


def holds_dataset_layout(folder: Union[str, Path], student_dataset: dict[str, Any]) -> bool:
    """True when `folder` holds more channel files per case than the student (a student's dataset.json with
    DATASET_KEY) reads: the dataset's layout, whose files student_case_files or student_input_files pick. False for
    a model that reads every channel, a missing folder, or a folder numbered as the student's."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder

    mapping = student_dataset.get(DATASET_KEY)
    if not mapping or not os.path.isdir(folder):
        return False
    ending = student_dataset["file_ending"]
    files = [f for f in os.listdir(folder) if f.endswith(ending)]
    cases = get_identifiers_from_splitted_dataset_folder(str(folder), ending)  # nnU-Net's <case>_XXXX<ending>
    return len(cases) > 0 and len(files) > len(cases) * len(mapping)


def student_case_files(folder: Union[str, Path], student_dataset: dict[str, Any]) -> list[list[str]]:
    """Every case of `folder` (the dataset's layout: ``<case>_<dataset channel:04d><file_ending>``), sorted by name,
    as the list of files the student reads, in its channel order: file i is dataset channel
    ``student_channel_order(student_dataset)[i]``. Nothing is written (student_input_files links such files).

    Raises:
        ChannelError: `student_dataset` is not a student's dataset.json, `folder` holds no case, or a case lacks one
            of the files.
    """
    order = student_channel_order(student_dataset)
    if order is None:
        raise ChannelError(f"this dataset.json has no {DATASET_KEY} entry: the model reads every channel of the "
                           f"dataset, its files need no picking")
    ending = student_dataset["file_ending"]
    pattern = re.compile(rf"^(.*)_(\d{{4}}){re.escape(ending)}$")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    cases = sorted({m.group(1) for f in names if (m := pattern.match(f))})
    if not cases:
        raise ChannelError(f"no case in {folder}: expected the dataset's files <case>_XXXX{ending}")
    files = [[str(Path(folder) / f"{case}_{c:04d}{ending}") for c in order] for case in cases]
    missing = [os.path.basename(f) for case_files in files for f in case_files if not os.path.isfile(f)]
    if missing:
        raise ChannelError(f"{len(missing)} channel file(s) of the student are missing in {folder}: "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return files


def student_input_files(input_folder: Union[str, Path], output_folder: Union[str, Path],
                        student_dataset: dict[str, Any]) -> list[str]:
    """Link the student's channel files of every case in `input_folder` (the dataset's layout) into `output_folder`
    under the student's numbering; returns the case identifiers.

    Raises:
        ChannelError: `student_dataset` is not a student's dataset.json, or a case lacks one of the files.
    """
    mapping = student_dataset.get(DATASET_KEY)
    if not mapping:
        raise ChannelError(f"this dataset.json has no {DATASET_KEY} entry: the model reads every channel of the "
                           f"dataset, its input folder needs no conversion")
    ending = student_dataset["file_ending"]
    pattern = re.compile(rf"^(.*)_(\d{{4}}){re.escape(ending)}$")
    cases = sorted({m.group(1) for f in os.listdir(input_folder) if (m := pattern.match(f))})
    os.makedirs(output_folder, exist_ok=True)
    missing = []
    for case in cases:
        for student_channel, entry in sorted(mapping.items(), key=lambda kv: int(kv[0])):
            source = Path(input_folder) / f"{case}_{entry['dataset_channel']:04d}{ending}"
            if not source.is_file():
                missing.append(source.name)
                continue
            target = Path(output_folder) / f"{case}_{int(student_channel):04d}{ending}"
            if target.is_symlink() or target.exists():
                target.unlink()
            target.symlink_to(source.resolve())
    if missing:
        raise ChannelError(f"{len(missing)} channel file(s) of the student are missing in {input_folder}: "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return cases
