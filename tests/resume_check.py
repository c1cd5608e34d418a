"""Run by the end-to-end test in its own process, with that test's nnU-Net environment.

Builds the trainer exactly as `nnUNetv2_train DATASET CONFIG FOLD -tr TRAINER --c` does (nnU-Net's own
get_trainer_from_args and maybe_load_checkpoint), then checks that the distiller, the optimizer (every
parameter group and its momentum buffers), the grad scaler and the epoch equal the checkpoint it resumed
from, bit for bit. Prints RESUMED-BITWISE <epoch> on success; any difference raises.

    python tests/resume_check.py DATASET CONFIG FOLD TRAINER SAVED_CHECKPOINT
"""

from __future__ import annotations

import sys

import torch
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint


def _equal(a, b, where: str) -> None:
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b)):
            raise AssertionError(f"{where} differs after resume")
    elif isinstance(a, dict):
        if set(a) != set(b):
            raise AssertionError(f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}")
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise AssertionError(f"{where}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    elif a != b:
        raise AssertionError(f"{where}: {a!r} vs {b!r}")


def main(dataset: str, configuration: str, fold: str, trainer_name: str, saved_path: str) -> None:
    saved = torch.load(saved_path, map_location="cpu", weights_only=False)
    trainer = get_trainer_from_args(dataset, configuration, int(fold), trainer_name, "nnUNetPlans",
                                    continue_training=True, device=torch.device("cpu"))
    maybe_load_checkpoint(trainer, continue_training=True, validation_only=False)
    assert trainer.current_epoch == saved["current_epoch"], (trainer.current_epoch, saved["current_epoch"])
    _equal(trainer.distiller.state_dict(), saved["recokd"]["distiller"], "distiller")
    assert len(saved["recokd"]["distiller"]) > 0, "the checkpoint holds no distillation modules"
    optimizer = trainer.optimizer.state_dict()
    assert len(optimizer["param_groups"]) == 2, "student and distillation modules: two parameter groups"
    n_student = len(list(trainer.network.parameters()))
    assert len(optimizer["param_groups"][1]["params"]) == len(list(trainer.distiller.parameters()))
    assert all(i in optimizer["state"] for i in optimizer["param_groups"][1]["params"]), "no momentum restored"
    _equal(optimizer, saved["optimizer_state"], "optimizer")
    scaler = trainer.grad_scaler.state_dict() if trainer.grad_scaler is not None else None
    _equal(scaler, saved["grad_scaler_state"], "grad_scaler")
    _equal(trainer.network.state_dict(), saved["network_weights"], "network")
    print(f"RESUMED-BITWISE {trainer.current_epoch} student params {n_student}")


if __name__ == "__main__":
    main(*sys.argv[1:])
