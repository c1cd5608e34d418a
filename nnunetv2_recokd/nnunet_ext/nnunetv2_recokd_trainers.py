"""nnU-Net trainer shim for nnunetv2-recokd.

This folder is the ONLY one to put in nnUNet_extTrainer (`nnunetv2_recokd ext-path` prints it), and
`nnunetv2_recokd install` writes a copy of this file into nnU-Net's own trainer folder. It only
re-exports our trainers. nnU-Net imports every module of its trainer folder on each lookup, so this
file must never break nnU-Net: if nnunetv2-recokd was uninstalled it does nothing, and any other
import problem becomes a warning.
"""

try:
    from nnunetv2_recokd.trainers import *  # noqa: F401,F403
except ModuleNotFoundError as _e:
    if _e.name != "nnunetv2_recokd":  # only "our package was uninstalled" is silent
        import warnings

        warnings.warn(f"nnunetv2-recokd trainers unavailable: {_e!r}")
except Exception as _e:  # noqa: BLE001 - never let our package stop nnU-Net from finding its own trainers
    import warnings

    warnings.warn(f"nnunetv2-recokd trainers unavailable: {_e!r}")
