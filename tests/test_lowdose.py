"""Simulated low-dose CT (inputs/lowdose.py) and `nnunetv2_recokd evaluate-dose`.

Projection and FBP are checked against closed forms (the chord of a disc, the disc itself) and against
scikit-image's radon/iradon where it is installed; the noise against the transmission model's scaling laws on a
uniform water cylinder; the batch helper against nnU-Net's own CTNormalization; the command end to end on two tiny
synthetic CT cases with a random-weight nnU-Net model (stock trainer, CT-normalised plans).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_recokd import sandbox
from nnunetv2_recokd.evaluation import dose as dose_evaluation
from nnunetv2_recokd.cli import main as cli_main
from nnunetv2_recokd.deploy.modelfolder import open_model_folder
from nnunetv2_recokd.inputs import lowdose as L
from nnunetv2_recokd.synthetic import make_case

CT_PROPS = {"max": 300.0, "mean": 80.0, "median": 70.0, "min": -100.0, "percentile_00_5": -50.0,
            "percentile_99_5": 250.0, "std": 50.0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def disc_image(n: int, spacing: tuple[float, float], r: float, x0: float, y0: float, ss: int = 8) -> torch.Tensor:
    """(n, n) fraction of each pixel inside the disc |(x, y) - (x0, y0)| <= r (mm; x along columns, y along rows,
    centred), from ss x ss sub-samples: the partial-volume image whose line integrals are the chord lengths."""
    off = (torch.arange(ss, dtype=torch.float64) + 0.5) / ss - 0.5
    centres = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    y = ((centres[:, None] + off[None]) * spacing[0]).reshape(-1)
    x = ((centres[:, None] + off[None]) * spacing[1]).reshape(-1)
    inside = ((x[None, :] - x0) ** 2 + (y[:, None] - y0) ** 2 <= r * r).float()
    return inside.reshape(n, ss, n, ss).mean((1, 3))


def water_cylinder(n: int = 64, radius: float = 28.0, slices: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, slices, n, n) HU: water (0 HU) in a cylinder of `radius` mm along the slice axis, air around, 1 mm
    voxels; and the (n, n) mask of its central half radius (uniform noise region)."""
    c = torch.arange(n) - (n - 1) / 2
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    hu = torch.where(r2 <= radius ** 2, 0.0, -1000.0).expand(slices, n, n)[None].clone()
    return hu, r2 <= (radius / 2) ** 2


def added_noise(hu: torch.Tensor, dose: float, region: torch.Tensor, seed: int = 0, **settings) -> torch.Tensor:
    low = L.simulate_low_dose(hu, dose, (1.0, 1.0, 1.0), generator=torch.Generator().manual_seed(seed), **settings)
    return (low - hu)[0][:, region]


# ------------------------------------------------------------------------------------ projection and FBP
@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.8, 0.8)])
def test_projection_of_a_disc_is_its_chord(spacing):
    n, r, x0, y0, views = 64, 18.0, 5.0, -3.0, 45
    sinogram = L.project_parallel(disc_image(n, spacing, r, x0, y0)[None], spacing, views)[0]
    bins, bin_mm = L.detector_bins(n, n, spacing)
    assert sinogram.shape == (views, bins) and bin_mm == min(spacing)
    s = (torch.arange(bins) - (bins - 1) / 2) * bin_mm
    theta = torch.arange(views) * math.pi / views
    s0 = x0 * torch.cos(theta)[:, None] + y0 * torch.sin(theta)[:, None]  # the disc centre moves with the view
    chord = 2 * torch.sqrt((r * r - (s - s0) ** 2).clamp(min=0))
    interior = (s - s0).abs() < r - 2  # off the tangent rays, where the chord changes by mm per bin
    assert (sinogram - chord)[interior].abs().max() < 0.6  # mm, on chords up to 36 mm
    # every view sees the whole disc: its area, pi r^2
    assert torch.allclose(sinogram.sum(1) * bin_mm, torch.full((views,), math.pi * r * r), rtol=5e-3)


@pytest.mark.parametrize("window,interior_tolerance", [("ram-lak", 0.04), ("hann", 0.04)])
def test_fbp_reconstructs_a_disc(window, interior_tolerance):
    n, r, x0, y0, spacing = 64, 18.0, 5.0, -3.0, (1.0, 1.0)
    disc = disc_image(n, spacing, r, x0, y0)
    recon = L.fbp_parallel(L.project_parallel(disc[None], spacing, 90), (n, n), spacing, window=window)[0]
    c = torch.arange(n) - (n - 1) / 2
    d2 = (c[None, :] - x0) ** 2 + (c[:, None] - y0) ** 2
    inside, outside = d2 <= (r - 3) ** 2, (d2 >= (r + 3) ** 2) & (d2 <= 28 ** 2)
    assert abs(recon[inside].mean().item() - 1) < 2e-3
    assert (recon[inside] - 1).abs().max() < interior_tolerance
    assert recon[outside].abs().max() < 0.06


def test_projection_and_fbp_match_scikit_image():
    skimage = pytest.importorskip("skimage")
    from skimage.transform import iradon, radon, rescale

    image = rescale(skimage.data.shepp_logan_phantom(), 65 / 400, anti_aliasing=True).astype(np.float32)
    n, views = image.shape[0], 90
    theta = np.arange(views) * 180 / views
    ours = L.project_parallel(torch.from_numpy(image)[None], (1.0, 1.0), views)[0].numpy()
    centre = (ours.shape[1] - 1) // 2
    ours_centre = ours[:, centre - (n - 1) // 2:centre + (n - 1) // 2 + 1].T  # skimage's n bins, (bins, views)
    # skimage's view at theta is ours at -theta, i.e. at 180 - theta with the detector reversed
    mapped = np.concatenate([ours_centre[:, :1], ours_centre[::-1, :0:-1]], 1)
    reference = radon(image, theta=theta, circle=True)
    assert np.abs(mapped - reference).max() < 1e-3 * np.abs(reference).max()
    c = np.arange(n) - (n - 1) / 2
    circle = np.add.outer(c ** 2, c ** 2) < (n / 2 - 2) ** 2
    for name, window in (("ramp", "ram-lak"), ("shepp-logan", "shepp-logan"), ("cosine", "cosine")):
        ours_fbp = L.fbp_parallel(torch.from_numpy(ours)[None], (n, n), (1.0, 1.0), window=window)[0].numpy()
        expected = iradon(reference, theta=theta, filter_name=name, circle=True)
        assert np.abs(ours_fbp - expected)[circle].max() < 1e-4, name


# ------------------------------------------------------------------------------------------ the noise
def test_dose_one_returns_the_input_and_never_modifies_it():
    hu, _ = water_cylinder(32, 12.0, 2)
    hu = torch.cat([hu, hu])
    before = hu.clone()
    same = L.simulate_low_dose(hu, 1.0, (1.0, 1.0, 1.0))
    assert torch.equal(same, hu) and same.data_ptr() != hu.data_ptr()
    mixed = L.simulate_low_dose(hu, torch.tensor([1.0, 0.25]), (1.0, 1.0, 1.0))
    assert torch.equal(mixed[0], hu[0]) and not torch.equal(mixed[1], hu[1])
    assert torch.equal(hu, before)


def test_noise_grows_as_dose_falls_like_the_dose_difference():
    """Without electronic noise the added variance is (1/a - 1) / counts (binomial thinning), so the added std at
    dose a over that at 0.5 is sqrt((1/a - 1) / (1/0.5 - 1)): sqrt(3) at 0.25, 3 at 0.1. Tolerance 8%: over 20
    seeds the ratios scatter by 1.3-1.8% (16 slices x 615 correlated pixels) around a +0.7% bias (the log's second
    order), so 8% is more than 4 standard deviations while a wrong law (1/sqrt(a): 1.41 and 2.24) fails by far."""
    hu, region = water_cylinder()
    std = {a: added_noise(hu, a, region, i0=1e4, electronic_noise=0.0).std().item() for a in (0.5, 0.25, 0.1)}
    assert std[0.5] < std[0.25] < std[0.1]
    assert std[0.25] / std[0.5] == pytest.approx(math.sqrt(3), rel=0.08)
    assert std[0.1] / std[0.5] == pytest.approx(3.0, rel=0.08)
    # fewer photons: more noise, variance ~ 1 / i0
    assert added_noise(hu, 0.25, region, i0=2.5e3, electronic_noise=0.0).std().item() / std[0.25] == \
        pytest.approx(2.0, rel=0.08)


def test_a_full_dose_scan_ends_with_noise_one_over_sqrt_dose():
    """A noise-free phantom taken to dose 0.01 of a 100x flux is a scan at the reference flux (variance (1/0.01 - 1)
    / (100 i0) = 0.99 / i0); its low-dose versions then carry 0.99/i0 + (1/a - 1)/i0, i.e. total noise ~ 1/sqrt(a)."""
    hu, region = water_cylinder()
    i0 = 1e4
    scan = L.simulate_low_dose(hu, 0.01, (1.0, 1.0, 1.0), i0=100 * i0, electronic_noise=0.0,
                               generator=torch.Generator().manual_seed(5))
    total = {}
    for a in (1.0, 0.25):
        low = L.simulate_low_dose(scan, a, (1.0, 1.0, 1.0), i0=i0, electronic_noise=0.0,
                                  generator=torch.Generator().manual_seed(6))
        total[a] = (low - hu)[0][:, region].std().item()
    assert total[0.25] / total[1.0] == pytest.approx(2.0, rel=0.08)


def test_noise_is_unbiased_and_independent_of_the_number_of_views():
    hu, region = water_cylinder()
    noise = {views: added_noise(hu, 0.25, region, i0=1e4, n_angles=views) for views in (32, 128)}
    for values in noise.values():
        # correlated pixels: the standard error of the mean is a few times std / sqrt(n); 0.1 std is > 4 of them
        assert abs(values.mean().item()) < 0.1 * values.std().item()
    assert noise[32].std().item() == pytest.approx(noise[128].std().item(), rel=0.08)


def test_electronic_noise_and_slice_thickness():
    hu, region = water_cylinder(slices=8)
    quiet = added_noise(hu, 0.1, region, i0=1e3, electronic_noise=0.0).std().item()
    loud = added_noise(hu, 0.1, region, i0=1e3, electronic_noise=100.0).std().item()
    assert loud > 1.2 * quiet
    thick = L.simulate_low_dose(hu, 0.1, (4.0, 1.0, 1.0), i0=1e3, electronic_noise=0.0,
                                generator=torch.Generator().manual_seed(0))
    # 4x the photons per reading: half the noise
    assert (thick - hu)[0][:, region].std().item() / quiet == pytest.approx(0.5, rel=0.08)


def test_seeded_generator_repeats_and_two_dimensional_input():
    hu, _ = water_cylinder(32, 12.0, 2)
    one = L.simulate_low_dose(hu, 0.3, (1.0, 1.0, 1.0), generator=torch.Generator().manual_seed(3))
    two = L.simulate_low_dose(hu, 0.3, (1.0, 1.0, 1.0), generator=torch.Generator().manual_seed(3))
    other = L.simulate_low_dose(hu, 0.3, (1.0, 1.0, 1.0), generator=torch.Generator().manual_seed(4))
    assert torch.equal(one, two) and not torch.equal(one, other)
    flat = L.simulate_low_dose(hu[:, 0], 0.3, (1.0, 1.0), generator=torch.Generator().manual_seed(3))  # (B, H, W)
    assert flat.shape == hu[:, 0].shape and not torch.equal(flat, hu[:, 0])


def test_invalid_settings_are_refused():
    hu, _ = water_cylinder(16, 6.0, 1)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        L.simulate_low_dose(hu, 1.5, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        L.simulate_low_dose(hu, 0.0, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="all 3 spatial axes"):
        L.simulate_low_dose(hu, 0.5, (1.0, 1.0))
    with pytest.raises(ValueError, match="one per sample"):
        L.simulate_low_dose(hu, torch.tensor([0.5, 0.5]), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="unknown window"):
        L.simulate_low_dose(hu, 0.5, (1.0, 1.0, 1.0), window="gauss")


# ----------------------------------------------------------------------------------- nnU-Net batches
def test_normalisation_round_trip_equals_nnunets_ct_normalization():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization

    hu = np.random.default_rng(0).normal(60, 200, (3, 8, 9)).astype(np.float32)
    expected = CTNormalization(use_mask_for_norm=False, intensityproperties=CT_PROPS).run(hu.copy())
    ours = L.ct_normalised_from_hu(torch.from_numpy(hu), CT_PROPS)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-6)
    back = L.hu_from_ct_normalised(ours, CT_PROPS).numpy()
    np.testing.assert_allclose(back, np.clip(hu, -50.0, 250.0), rtol=0, atol=1e-4)


def test_degrade_ct_channels_leaves_the_teachers_input_and_other_channels_alone():
    data = torch.randn(2, 2, 6, 32, 32, generator=torch.Generator().manual_seed(0))
    teacher = data.clone()
    props = {0: CT_PROPS}
    out = L.degrade_ct_channels(data, [0], props, torch.tensor([0.1, 1.0]), (1.0, 1.0, 1.0), i0=1e3,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(data, teacher)  # the input is untouched
    assert torch.equal(out[:, 1], data[:, 1])  # the non-CT channel
    assert torch.equal(out[1], data[1])  # the sample at dose 1
    assert not torch.equal(out[0, 0], data[0, 0])
    lower, upper = (L.ct_normalised_from_hu(torch.tensor(v), CT_PROPS).item() for v in (-50.0, 250.0))
    assert out[0, 0].min() >= lower - 1e-6 and out[0, 0].max() <= upper + 1e-6  # normalised again, with clipping
    with pytest.raises(KeyError, match="channel 1"):
        L.degrade_ct_channels(data, [0, 1], props, torch.tensor([0.5, 0.5]), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="out of range"):
        L.degrade_ct_channels(data, [2], props, torch.tensor([0.5, 0.5]), (1.0, 1.0, 1.0))


def test_ct_channels_and_intensity_properties_from_plans():
    assert L.ct_channels(["CTNormalization", "ZScoreNormalization", "CTNormalization"]) == [0, 2]
    plans = {"foreground_intensity_properties_per_channel": {"0": CT_PROPS, "1": CT_PROPS}}
    assert L.intensity_properties(plans, [1]) == {1: CT_PROPS}
    with pytest.raises(KeyError, match="channel"):
        L.intensity_properties(plans, [3])


def test_draw_doses_rate_range_and_seed():
    n = 20000
    doses = L.draw_doses(n, (0.1, 1.0), probability=0.3, generator=torch.Generator().manual_seed(0))
    degraded = doses < 1
    # binomial rate: standard deviation sqrt(0.3 * 0.7 / n) = 0.0032; 0.015 is more than 4 of them
    assert degraded.float().mean().item() == pytest.approx(0.3, abs=0.015)
    assert doses.min() >= 0.1 and doses.max() <= 1.0 and doses.dtype == torch.float32
    # log-uniform on [0.1, 1]: median sqrt(0.1) = 0.316, a uniform draw would give 0.55
    assert doses[degraded].median().item() == pytest.approx(math.sqrt(0.1), abs=0.03)
    fixed = L.draw_doses(64, 0.25, probability=1.0)
    assert torch.all(fixed == 0.25)
    assert torch.equal(L.draw_doses(8, (0.2, 0.9), 0.5, torch.Generator().manual_seed(1)),
                       L.draw_doses(8, (0.2, 0.9), 0.5, torch.Generator().manual_seed(1)))
    assert torch.all(L.draw_doses(16, 0.5, probability=0.0) == 1.0)
    with pytest.raises(ValueError):
        L.draw_doses(4, (0.5, 1.5))
    with pytest.raises(ValueError):
        L.draw_doses(4, 0.5, probability=1.2)


# -------------------------------------------------------------------------------------- evaluate-dose
def write_ct_case(rng: np.random.Generator, folder: Path, labels: Path, name: str, size: int = 24) -> None:
    """One synthetic CT case in HU: a water-like body (0 HU) in air, the organ at 60 HU, lesions at 150 HU."""
    _, label = make_case(rng, size, 0.15)
    c = np.arange(size) - (size - 1) / 2
    body = (c[None, :, None] ** 2 + c[None, None, :] ** 2 <= (0.45 * size) ** 2) | (label > 0)
    hu = np.where(body, 0.0, -1000.0) + np.where(label == 1, 60.0, 0.0) + np.where(label == 2, 150.0, 0.0)
    hu = hu + rng.normal(0, 10, hu.shape)
    for array, path in ((hu.astype(np.float32), folder / f"{name}_0000.nii.gz"), (label, labels / f"{name}.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 1.5))
        sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def ct_world(tmp_path_factory):
    """A random-weight stock nnU-Net model whose plans normalise channel 0 with CTNormalization, 2 CT cases and
    their labels, and a copy of the model with Z-score plans (no CT channel)."""
    root = tmp_path_factory.mktemp("dose")
    plans, dataset = sandbox.unet_plans((16, 32, 64), (16, 16, 16)), sandbox.dataset_json()
    dataset["channel_names"] = {"0": "CT"}
    zscore = sandbox.write_random_teacher(root / "zscore" / "nnUNetTrainer__nnUNetPlans__3d_fullres", plans, dataset)
    plans = copy.deepcopy(plans)
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["CTNormalization"]
    plans["foreground_intensity_properties_per_channel"] = {"0": CT_PROPS}
    model = sandbox.write_random_teacher(root / "ct" / "nnUNetTrainer__nnUNetPlans__3d_fullres", plans, dataset)
    images, labels = root / "imagesTs", root / "labelsTs"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(7)
    for i in range(2):
        write_ct_case(rng, images, labels, f"case_{i:03d}")
    return root, model, zscore, images, labels


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_evaluate_dose_writes_the_table_and_degrades_only_below_full_dose(ct_world, capsys):
    root, model, _, images, labels = ct_world
    out = root / "run"
    code = cli_main(["evaluate-dose", "-m", str(model), "-i", str(images), "-l", str(labels), "-o", str(out),
                     "--doses", "1.0", "0.5", "0.1", "--keep-images", "--disable_tta", "-device", "cpu",
                     "--i0", "1000"])
    assert code == 0, capsys.readouterr().err
    table = json.loads((out / "dose_table.json").read_text())
    assert [row["dose"] for row in table["rows"]] == [1.0, 0.5, 0.1]
    assert table["cases"] == ["case_000", "case_001"] and table["n_cases"] == 2
    assert table["channels"] == [0] and table["seed"] == 0 and table["simulation"]["i0"] == 1000
    for row in table["rows"]:
        assert list(row["dice"]) == ["organ", "lesion"] and row["n_cases"] == 2
        assert all(0.0 <= v <= 1.0 for v in row["dice"].values())
    markdown = (out / "dose_table.md").read_text()
    assert "| dose | organ | lesion | mean |" in markdown
    assert [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| 0") or
            line.startswith("| 1")] == ["1", "0.5", "0.1"]
    assert not any(p.name.startswith(".degraded_") for p in out.iterdir())  # the scratch folder is gone

    # dose 1.0 is the prediction of the untouched images by nnU-Net's predictor
    predictor = dose_evaluation.make_predictor(open_model_folder(model), torch.device("cpu"), False, 0.5)
    direct = root / "direct"
    direct.mkdir()
    predictor.predict_from_files_sequential(str(images), str(direct), save_probabilities=False, overwrite=True)
    for case in ("case_000", "case_001"):
        assert np.array_equal(_array(out / "dose_1" / f"{case}.nii.gz"), _array(direct / f"{case}.nii.gz"))

    # lower doses change the inputs, more noise at lower dose, same geometry
    spread = {}
    for d in ("0.5", "0.1"):
        source, degraded = images / "case_000_0000.nii.gz", out / f"images_dose_{d}" / "case_000_0000.nii.gz"
        a, b = sitk.ReadImage(str(source)), sitk.ReadImage(str(degraded))
        assert b.GetSpacing() == a.GetSpacing() and b.GetOrigin() == a.GetOrigin()
        difference = sitk.GetArrayFromImage(b) - sitk.GetArrayFromImage(a)
        assert np.abs(difference).max() > 1.0
        spread[d] = difference.std()
    assert spread["0.1"] > 1.5 * spread["0.5"]
    assert not (out / "images_dose_1").exists()


def test_evaluate_dose_noise_is_seeded_per_case_and_in_the_axial_plane(ct_world, tmp_path):
    _, model, _, images, _ = ct_world
    cases = [[str(images / "case_000_0000.nii.gz")], [str(images / "case_001_0000.nii.gz")]]
    names = ["case_000", "case_001"]
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, order in ((first, [0, 1]), (second, [1])):
        dose_evaluation.write_degraded_inputs([cases[i] for i in order], [names[i] for i in order], [0], 0.25, folder,
                                       seed=0, device=torch.device("cpu"), settings={"i0": 1000.0})
    # the same case gets the same noise whatever else is evaluated with it
    assert np.array_equal(_array(first / "case_001_0000.nii.gz"), _array(second / "case_001_0000.nii.gz"))

    # a volume stored with the head-foot axis last in the array: the noise must be independent along that axis and
    # correlated (FBP texture) within the axial plane
    size = 32
    c = np.arange(size) - (size - 1) / 2
    water = np.where(c[:, None, None] ** 2 + c[None, :, None] ** 2 <= 14 ** 2, 0.0, -1000.0)
    image = sitk.GetImageFromArray(np.broadcast_to(water, (size, size, size)).astype(np.float32))
    image.SetDirection((0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0))  # index axis x (array axis 2) is patient z
    assert dose_evaluation.slice_axis(image) == 2
    source, target = tmp_path / "rot_0000.nii.gz", tmp_path / "rot_low_0000.nii.gz"
    sitk.WriteImage(image, str(source))
    dose_evaluation.degrade_file(source, target, 0.1, 0, torch.device("cpu"), {"i0": 1000.0})
    noise = (_array(target) - _array(source))[8:24, 8:24, 4:28]

    def neighbour_correlation(axis: int) -> float:
        a, b = np.moveaxis(noise, axis, 0)[:-1].ravel(), np.moveaxis(noise, axis, 0)[1:].ravel()
        return float(np.corrcoef(a, b)[0, 1])

    assert abs(neighbour_correlation(2)) < 0.1
    assert neighbour_correlation(0) > 0.2 and neighbour_correlation(1) > 0.2


def test_evaluate_dose_explains_what_is_missing(ct_world, capsys):
    root, model, zscore, images, labels = ct_world
    code = cli_main(["evaluate-dose", "-m", str(zscore), "-i", str(images), "-l", str(labels), "-o",
                     str(root / "no_ct")])
    err = capsys.readouterr().err
    assert code == 1 and "CTNormalization" in err and "--channels" in err
    partial = root / "partial_labels"
    partial.mkdir()
    (partial / "case_000.nii.gz").write_bytes((labels / "case_000.nii.gz").read_bytes())
    code = cli_main(["evaluate-dose", "-m", str(model), "-i", str(images), "-l", str(partial), "-o",
                     str(root / "no_labels")])
    err = capsys.readouterr().err
    assert code == 1 and "case_001.nii.gz" in err
    code = cli_main(["evaluate-dose", "-m", str(model), "-i", str(images), "-l", str(labels), "-o",
                     str(root / "bad_dose"), "--doses", "1.0", "2.0"])
    assert code == 1 and "(0, 1]" in capsys.readouterr().err
