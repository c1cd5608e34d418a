"""A tiny nnU-Net setup built in-process (no planning, no data loading) for trainer-level tests."""

from __future__ import annotations

from pathlib import Path

from nnunetv2_recokd import sandbox
from nnunetv2_recokd.sandbox import make_trainer  # noqa: F401  (re-exported for the tests)

PATCH = (16, 16, 16)


def setup_env(root: Path, monkeypatch, regions: bool = False, teacher: bool = True) -> tuple[dict, dict]:
    """nnUNet_* folders under root and a random full-width teacher exported as RECOKD_TEACHER."""
    plans, dataset = sandbox.unet_plans((16, 32, 64), PATCH), sandbox.dataset_json(regions)
    env: dict = {}
    sandbox.prepare_folders(root, plans, env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("RECOKD_CONFIG", raising=False)
    monkeypatch.delenv("RECOKD_TEACHER", raising=False)
    if teacher:
        folder = sandbox.write_random_teacher(root / "teacher" / "nnUNetTrainer__nnUNetPlans__3d_fullres", plans,
                                              dataset)
        monkeypatch.setenv("RECOKD_TEACHER", str(folder))
    return plans, dataset


def tiny_batch(regions: bool = False, seed: int = 0) -> dict:
    return sandbox.make_batch(PATCH, 2, n_targets=2, regions=regions, seed=seed)


# a sitecustomize.py that makes a Python interpreter behave as if nnunetv2-recokd were not installed (stock
# nnU-Net predicting an exported model folder)
BLOCKER = '''
import sys
class _NoRecoKD:
    """Makes this interpreter behave as if nnunetv2-recokd were not installed."""
    def find_spec(self, name, path=None, target=None):
        if name == "nnunetv2_recokd" or name.startswith("nnunetv2_recokd."):
            raise ModuleNotFoundError("No module named 'nnunetv2_recokd'", name="nnunetv2_recokd")
        return None
sys.meta_path.insert(0, _NoRecoKD())
'''
