"""Per-epoch logging of the distillation terms in nnU-Net's own logger, and progress.png with them drawn.

nnU-Net's LocalLogger keeps one list per key with exactly one value per epoch and draws three panels
(losses and pseudo Dice, epoch time, learning rate). DistillLocalLogger draws the same three and a
fourth with the segmentation loss and every raw distillation term (symmetric log scale: their
magnitudes differ by orders and the seg loss is negative). Keys are added on first use and padded
with NaN so that a key that appears late (resuming a checkpoint written before it existed) stays
aligned with the epoch index.
"""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

KD_PREFIX = "train_kd_"
SEG_KEY = "train_seg_loss"


def ensure_key(local_logger: LocalLogger, key: str, epoch: int) -> None:
    """Register `key` in nnU-Net's logger, padded with NaN up to `epoch` (exclusive)."""
    values = local_logger.my_fantastic_logging.setdefault(key, [])
    values.extend([math.nan] * (epoch - len(values)))


class DistillLocalLogger(LocalLogger):
    """nnU-Net's LocalLogger whose progress.png has a fourth panel for the distillation terms."""

    def plot_progress_png(self, output_folder: str) -> None:
        log = self.my_fantastic_logging
        base_keys = ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice", "lrs",
                     "epoch_start_timestamps", "epoch_end_timestamps")
        n = min(len(log[k]) for k in base_keys)
        if n == 0:
            return
        x = list(range(n))
        fig, (ax_loss, ax_time, ax_lr, ax_kd) = plt.subplots(4, 1, figsize=(16, 26))
        ax_loss.plot(x, log["train_losses"][:n], color="b", label="loss_tr (seg + weighted KD)", linewidth=3)
        ax_loss.plot(x, log["val_losses"][:n], color="r", label="loss_val (seg)", linewidth=3)
        ax_dice = ax_loss.twinx()
        ax_dice.plot(x, log["mean_fg_dice"][:n], color="g", ls="dotted", label="pseudo dice", linewidth=2)
        ax_dice.plot(x, log["ema_fg_dice"][:n], color="g", label="pseudo dice (mov. avg.)", linewidth=3)
        ax_loss.set(xlabel="epoch", ylabel="loss")
        ax_dice.set_ylabel("pseudo dice")
        ax_loss.legend(loc="upper left")
        ax_dice.legend(loc="upper right")

        durations = [e - s for s, e in zip(log["epoch_start_timestamps"][:n], log["epoch_end_timestamps"][:n])]
        ax_time.plot(x, durations, color="b", label="epoch duration", linewidth=3)
        ax_time.set(xlabel="epoch", ylabel="time [s]", ylim=(0, max(durations) * 1.1 or 1))
        ax_time.legend(loc="upper left")

        ax_lr.plot(x, log["lrs"][:n], color="b", label="learning rate", linewidth=3)
        ax_lr.set(xlabel="epoch", ylabel="learning rate")
        ax_lr.legend(loc="upper left")

        curves = {k: log[k][:n] for k in sorted(log) if (k == SEG_KEY or k.startswith(KD_PREFIX)) and len(log[k]) >= n}
        for key, values in curves.items():
            name = key[len(KD_PREFIX):]
            label = "seg loss" if key == SEG_KEY else name if name.endswith("weighted") else f"{name} (raw)"
            ax_kd.plot(x, values, label=label, linewidth=3)
        ax_kd.set(xlabel="epoch", ylabel="term value (raw, unweighted)", title="distillation terms")
        if curves:
            ax_kd.set_yscale("symlog", linthresh=1e-4)  # nnU-Net's seg loss is negative (Dice term)
            ax_kd.legend(loc="upper left", ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(output_folder, "progress.png"))
        plt.close(fig)
