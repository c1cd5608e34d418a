"""The wheel ships every trainer's defaults and the nnU-Net shim (a user installs from it, not from the repo)."""

import subprocess
import sys
import zipfile
from pathlib import Path

from nnunetv2_recokd.trainers import PUBLIC_TRAINERS

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_trainer_configs_and_shim(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           str(ROOT), "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("nnunetv2_recokd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for trainer in PUBLIC_TRAINERS:
        assert f"nnunetv2_recokd/trainer_configs/{trainer}.json" in names
    assert "nnunetv2_recokd/nnunet_ext/nnunetv2_recokd_trainers.py" in names
    assert not any(n.startswith(("tests/", "examples/")) for n in names)
