"""The wheel ships the settings (defaults.json and each trainer's changes) and the nnU-Net shim."""

import subprocess
import sys
import zipfile
from pathlib import Path

from nnunetv2_recokd.config import shipped_config_names

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_trainer_configs_and_shim(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           str(ROOT), "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("nnunetv2_recokd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.startswith("nnunetv2_recokd/trainer_configs/") and n.endswith(".json")}
    assert shipped == {f"nnunetv2_recokd/trainer_configs/{name}.json"
                       for name in ["defaults", *shipped_config_names()]}
    assert len(shipped) > 10
    assert "nnunetv2_recokd/nnunet_ext/nnunetv2_recokd_trainers.py" in names
    assert "nnunetv2_recokd/__main__.py" in names  # `python -m nnunetv2_recokd` from an installed wheel
    assert {"nnunetv2_recokd/deploy/export.py", "nnunetv2_recokd/deploy/predictor.py",
            "nnunetv2_recokd/deploy/runtime.py", "nnunetv2_recokd/evaluation/summary.py",
            "nnunetv2_recokd/evaluation/tables.py"} <= names
    assert not any(n.startswith(("tests/", "examples/")) for n in names)


def test_public_trainer_names_are_the_trainers_exported():
    """trainer_names.py lists the -tr names without importing the trainers (the predict command reads it): each
    must be a trainer class the package exports, and every trainer class the package imports must be listed."""
    from nnunetv2_recokd import trainers
    from nnunetv2_recokd.trainer_names import PUBLIC_TRAINERS
    from nnunetv2_recokd.trainers.base import nnUNetTrainerDistillBase

    assert all(issubclass(getattr(trainers, name), nnUNetTrainerDistillBase) for name in PUBLIC_TRAINERS)
    imported = {name for name, value in vars(trainers).items()
                if isinstance(value, type) and issubclass(value, nnUNetTrainerDistillBase)}
    assert imported == {"nnUNetTrainerDistillBase", *PUBLIC_TRAINERS}
