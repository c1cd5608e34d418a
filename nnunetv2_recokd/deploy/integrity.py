"""Is an input image file whole? Checks that catch what nnU-Net's default reader lets through.

SimpleITK (nnU-Net's default reader) reads a truncated NIfTI file without an error: a .nii.gz cut anywhere after its
header, or a .nii shorter than its header says, comes back as an image of the right shape whose missing voxels are
zeros -- and would be predicted as if nothing were wrong. So before a case is read, each of its files is checked:

- a gzip file (.nii.gz, or any ``*.gz``) is decompressed to its end: a cut stream or a bad checksum is an error;
- a NIfTI file (.nii, .nii.gz; NIfTI-1 and NIfTI-2, single-file) must hold as many bytes as its header's voxel
  offset plus its dimensions times bits per voxel.

Other formats are left to their reader. The check reads each file once more (decompressing a .nii.gz twice: about
1 % of a CT-sized case's prediction time on a CPU).
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Union

from nnunetv2_recokd.deploy.modelfolder import DeployError

CHUNK = 1 << 20


class CorruptInputError(DeployError):
    """An input file is cut short or damaged; the message names it and says what is wrong."""


def check_image_file(path: Union[str, Path]) -> None:
    """Raise CorruptInputError when the file is a truncated or damaged gzip stream or a NIfTI file shorter than its
    header says; any other file passes (its reader has the last word)."""
    path = Path(path)
    name = path.name.lower()
    nifti = name.endswith((".nii", ".nii.gz"))
    if not name.endswith(".gz") and not nifti:
        return
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                head = f.read(540)
                size = len(head)
                while chunk := f.read(CHUNK):
                    size += len(chunk)
        else:
            with open(path, "rb") as f:
                head = f.read(540)
            size = os.path.getsize(path)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise CorruptInputError(f"{path}: not a complete, valid gzip file ({e}): cut short or damaged: copy or "
                                f"convert it again") from None
    except OSError as e:
        raise CorruptInputError(f"{path}: cannot be read ({e})") from None
    if nifti:
        expected = nifti_bytes(head)
        if expected is not None and size < expected:
            held = f"{size} bytes{' uncompressed' if name.endswith('.gz') else ''}"
            raise CorruptInputError(f"{path}: NIfTI file cut short: its header describes {expected} bytes (voxel "
                                    f"offset + voxels), the file holds {held}; copy or convert it again")


def nifti_bytes(head: bytes) -> Optional[int]:
    """Bytes a single-file NIfTI-1/NIfTI-2 image needs (voxel offset + voxel data) from its first 540 bytes; None
    when the header is not one (its reader will say so) or is a header of a .hdr/.img pair."""
    for endian in ("<", ">"):
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:  # NIfTI-1
            if head[344:348] != b"n+1\0":
                return None
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:  # NIfTI-2
            if head[4:8] != b"n+2\0":
                return None
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(d < 0 for d in dims[1:dims[0] + 1]):
        return None
    voxels = 1
    for d in dims[1:dims[0] + 1]:
        voxels *= max(int(d), 1)
    return offset + voxels * bitpix // 8
