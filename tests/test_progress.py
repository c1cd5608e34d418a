"""progress.png with a fourth panel for the distillation terms; late keys padded with NaN."""

import math
import struct

import pytest
from nnunetv2.training.logging.nnunet_logger import LocalLogger

from nnunetv2_recokd.trainers import progress
from nnunetv2_recokd.trainers.progress import KD_PREFIX, SEG_KEY, DistillLocalLogger, ensure_key

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fill(logger: LocalLogger, epochs: int, kd: bool = True) -> None:
    """What nnU-Net's trainer logs per epoch, plus the seg loss and one distillation term."""
    for e in range(epochs):
        logger.log("epoch_start_timestamps", 100.0 + 10 * e, e)
        logger.log("train_losses", -0.2 - 0.1 * e, e)
        logger.log("val_losses", -0.1 - 0.1 * e, e)
        logger.log("mean_fg_dice", 0.3 + 0.1 * e, e)
        logger.log("ema_fg_dice", 0.3 + 0.05 * e, e)
        logger.log("dice_per_class_or_region", [0.3 + 0.1 * e, 0.4], e)
        logger.log("lrs", 0.01 * (1 - e / 10) ** 0.9, e)
        logger.log("epoch_end_timestamps", 107.0 + 10 * e, e)
        if kd:
            for key, value in ((SEG_KEY, -0.3 - 0.1 * e), (KD_PREFIX + "logit", 0.05 / (e + 1))):
                ensure_key(logger, key, e)
                logger.log(key, value, e)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def captured_figures(monkeypatch):
    """The figures plot_progress_png draws, kept for inspection after it closes them."""
    figures = []
    close = progress.plt.close

    def keep(fig=None):
        figures.append(fig)
        close(fig)

    monkeypatch.setattr(progress.plt, "close", keep)
    return figures


def test_progress_png_has_a_distillation_panel(tmp_path, captured_figures):
    logger = DistillLocalLogger()
    fill(logger, 3)
    logger.plot_progress_png(str(tmp_path))
    png = tmp_path / "progress.png"
    assert png.is_file()
    assert png.stat().st_size > 10_000
    width, height = png_size(png)
    assert height / width == pytest.approx(26 / 16, rel=0.01)  # figsize (16, 26): four panels stacked

    (fig,) = captured_figures
    panels = [ax for ax in fig.axes if ax.get_ylabel() != "pseudo dice"]  # drop the dice twin axis
    assert len(panels) == 4
    kd_panel = panels[3]
    assert kd_panel.get_title() == "distillation terms"
    lines = {line.get_label(): list(line.get_ydata()) for line in kd_panel.get_lines()}
    assert set(lines) == {"seg loss", "logit (raw)"}
    assert lines["seg loss"] == pytest.approx([-0.3, -0.4, -0.5])
    assert lines["logit (raw)"] == pytest.approx([0.05, 0.025, 0.05 / 3])
    assert kd_panel.get_yscale() == "symlog"  # seg loss is negative, KD terms tiny


def test_progress_png_without_distillation_terms(tmp_path, captured_figures):
    logger = DistillLocalLogger()
    fill(logger, 2, kd=False)
    logger.plot_progress_png(str(tmp_path))
    assert (tmp_path / "progress.png").stat().st_size > 10_000
    (fig,) = captured_figures
    kd_panel = [ax for ax in fig.axes if ax.get_title() == "distillation terms"][0]
    assert kd_panel.get_lines() == []


def test_progress_png_draws_a_late_key_aligned_with_epochs(tmp_path, captured_figures):
    logger = DistillLocalLogger()
    fill(logger, 3, kd=False)
    ensure_key(logger, KD_PREFIX + "reco", 2)  # the term appeared at epoch 2 (e.g. resumed training)
    logger.log(KD_PREFIX + "reco", 0.7, 2)
    logger.plot_progress_png(str(tmp_path))
    (fig,) = captured_figures
    kd_panel = [ax for ax in fig.axes if ax.get_title() == "distillation terms"][0]
    (line,) = kd_panel.get_lines()
    y = list(line.get_ydata())
    assert math.isnan(y[0]) and math.isnan(y[1]) and y[2] == 0.7


def test_progress_png_with_no_epoch_writes_nothing(tmp_path):
    DistillLocalLogger().plot_progress_png(str(tmp_path))
    assert not (tmp_path / "progress.png").exists()


def test_distill_logger_is_an_nnunet_local_logger():
    logger = DistillLocalLogger(verbose=False)
    assert isinstance(logger, LocalLogger)
    assert "train_losses" in logger.my_fantastic_logging


def test_ensure_key_pads_with_nan():
    logger = LocalLogger()
    ensure_key(logger, "train_kd_graph", 3)
    values = logger.my_fantastic_logging["train_kd_graph"]
    assert len(values) == 3 and all(math.isnan(v) for v in values)
    logger.log("train_kd_graph", 0.5, 3)  # nnU-Net's own log() now accepts epoch 3
    assert values[3] == 0.5 and len(values) == 4


def test_ensure_key_registers_a_new_key_at_epoch_zero():
    logger = LocalLogger()
    with pytest.raises(AssertionError):
        logger.log("train_kd_logit", 1.0, 0)  # nnU-Net refuses unknown keys
    ensure_key(logger, "train_kd_logit", 0)
    assert logger.my_fantastic_logging["train_kd_logit"] == []
    logger.log("train_kd_logit", 1.0, 0)
    assert logger.my_fantastic_logging["train_kd_logit"] == [1.0]


def test_ensure_key_pads_a_gap_and_keeps_existing_values():
    logger = LocalLogger()
    logger.my_fantastic_logging["train_kd_logit"] = [1.0]
    ensure_key(logger, "train_kd_logit", 3)
    values = logger.my_fantastic_logging["train_kd_logit"]
    assert values[0] == 1.0 and len(values) == 3 and math.isnan(values[1]) and math.isnan(values[2])
    ensure_key(logger, "train_kd_logit", 1)  # already long enough: untouched
    assert len(values) == 3 and values[0] == 1.0
