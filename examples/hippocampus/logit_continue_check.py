"""Does the logit-KD term keep a student from separating two structures? Continue one checkpoint three ways.

Loads a LogitKD model folder's checkpoint (e.g. c_logitkd seed 1 after epoch 4, when it called the whole
hippocampus anterior) into its own trainer, then trains it on for --epochs x --iters steps through the trainer's
own train_step, optimizer state and learning-rate schedule, with one of:
  seg     nnU-Net's seg loss alone (the teacher is not run): the control's loss from that point;
  kl      the seg loss + the logit term as trained (every voxel);
  kl_fg   the seg loss + the logit term on the voxels within --radius voxels of the labelled foreground only
          (the background far from the structures gets the seg loss alone).
Every variant draws the same batches (--seed). After every --eval-every steps: nnU-Net's pseudo Dice per class
(the trainer's validation_step, tp / fp / fn summed) over --val-batches validation batches, the same for every
variant and every evaluation. One JSON line per evaluation; --json writes them all.

  nnUNet_n_proc_DA=0 nnUNet_preprocessed=$WORK/preprocessed nnUNet_results=$WORK/results_c_logitkd/s1 \\
  RECOKD_CONFIG=$WORK/config_c_logitkd_s1.json python examples/hippocampus/logit_continue_check.py 204 \\
      nnUNetTrainerLogitKD epoch_4.pth --variant kl_fg --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def near_foreground(target: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 1, *spatial) bool: voxels within `radius` voxels (a cube) of a voxel labelled > 0."""
    foreground = (target > 0).float()
    if radius > 0:
        foreground = F.max_pool3d(foreground, 2 * radius + 1, stride=1, padding=radius)
    return foreground > 0


def pseudo_dice(trainer, batches: list) -> list[float]:
    """nnU-Net's validation pseudo Dice per foreground class over the given validation batches."""
    trainer.network.eval()
    tp, fp, fn = 0, 0, 0
    with torch.no_grad():
        for batch in batches:
            out = trainer.validation_step(batch)
            tp, fp, fn = tp + out["tp_hard"], fp + out["fp_hard"], fn + out["fn_hard"]
    trainer.network.train()
    return [round(float(2 * t / max(1, 2 * t + p + n)), 4) for t, p, n in zip(tp, fp, fn)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("trainer")
    parser.add_argument("checkpoint", help="file name inside the fold folder, e.g. checkpoint_latest.pth")
    parser.add_argument("--variant", choices=("seg", "kl", "kl_fg"), required=True)
    parser.add_argument("--fold", default="0")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--val-batches", type=int, default=10)
    parser.add_argument("--radius", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()
    from logit_terms_check import load_trainer  # the script beside this one

    trainer, _ = load_trainer(args.dataset, args.trainer, args.fold, args.checkpoint, args.seed)
    train_loader, val_loader = trainer.get_dataloaders()
    val_batches = [next(val_loader) for _ in range(args.val_batches)]
    if args.variant == "seg":  # no teacher forward, no logit term: the seg loss alone
        trainer._distillation_terms = lambda data, target, out, *rest: out[0].sum() * 0
    elif args.variant == "kl_fg":
        trainer.distiller._valid = lambda target: near_foreground(target, args.radius)
    rows = []

    def evaluate(step: int) -> None:
        rows.append({"variant": args.variant, "start_epoch": start, "step": step,
                     "pseudo_dice": pseudo_dice(trainer, val_batches), "seconds": round(time.time() - t0)})
        print(json.dumps(rows[-1]), flush=True)

    start, t0 = trainer.current_epoch, time.time()
    evaluate(0)
    step = 0
    for epoch in range(start, start + args.epochs):
        trainer.current_epoch = epoch
        trainer.network.train()
        trainer.lr_scheduler.step(epoch)
        trainer._first_step_of_epoch = True
        for _ in range(args.iters):
            trainer.train_step(next(train_loader))
            step += 1
            if step % args.eval_every == 0:
                evaluate(step)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
