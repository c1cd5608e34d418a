"""Simulated low-dose CT (REACT-KD's dose degradation; Zeng et al. 2015 [1]), in torch, for the student's input.

The model, per axial slice (the plane of the LAST two spatial axes; nnU-Net puts the axis of coarsest spacing
first, which for CT is the slice axis, so a (B, Z, Y, X) patch holds Z axial slices):

1. HU -> linear attenuation, mu = mu_water (1 + HU / 1000), clamped at 0 (air; HU < -1000 is padding).
2. Parallel-beam line integrals p(theta, s) = integral of mu over the ray, in a transmission model with
   I = k * i0 * exp(-p) expected photons per reading at full dose (k below).
3. Lower dose = lower flux: a reading at dose fraction a has expected a * I photons (the flux taken proportional
   to the dose; Zeng et al. calibrate that relation per scanner from repeated scans). Zeng et al. [1] simulate the
   low-dose reading from the high-dose data as Poisson counts plus independent Gaussian electronic noise,
   N_a = Poisson(a I) + Normal(0, sigma_e^2), then p_a = ln(a k i0 / N_a) (as their abstract and the authors'
   released MATLAB routine do it; implemented from those, not from the full text). Our input is already a
   full-dose scan carrying its own noise, so adding all of N_a's noise would count the full-dose part twice (at
   a = 1 it would still add noise). We add only the difference, as Yu et al. [2] do in the post-log domain: the
   full-dose reading N = round(I) is thinned, each photon kept with probability a (Binomial(N, a) is exactly
   Poisson(a I) when N ~ Poisson(I)), and electronic noise of variance (1 - a^2) sigma_e^2 is added (a N already
   carries a^2 sigma_e^2 of it). Together with the scan's own noise the reading then has the mean and variance
   of Zeng's N_a; at a = 1 nothing is added and the input is returned unchanged. Counts below ``COUNT_FLOOR``
   are clamped before the log (photon starvation).
4. Reconstruct only the noise: x_a = x + FBP(p_a - p) (ramp filter, optionally windowed, and back-projection).
   FBP is linear, so the image content never passes through the projector and its discretisation error does
   not touch the signal; the noise carries the physics (more noise along strongly attenuating paths, streaky
   CT texture, independent per slice).
5. Back to HU.

Counts. ``i0`` is the incident count per reading of a reference scan: a 1 mm x 1 mm detector cell (at the
isocentre) and ``REFERENCE_VIEWS`` views over 180 degrees. A simulated reading is a bin of the pixel spacing, a
row of the slice thickness, and one of ``n_angles`` views, so it collects k = bin_mm * slice_mm *
REFERENCE_VIEWS / n_angles reference readings: mean and Poisson variance scale with k, electronic variance too.
The reconstructed noise variance, proportional to 1 / (views * counts per view), therefore does not depend on
``n_angles`` (a pure cost/texture choice), and thicker slices or coarser pixels get less noise per voxel, as on
a scanner.

Patches. A training patch is a piece of a body: its rays see only the patch, a real ray also crosses the tissue
around it. ``extra_water_mm`` adds that path as water to every ray (it lowers the counts by
exp(-mu_water * extra_water_mm)); 0 is right for whole axial slices (``nnunetv2_recokd evaluate-dose``). With
0 on patches the same nominal dose is milder in training than on whole slices.

Projection and reconstruction are pure torch (sparse matrices built once per geometry and cached, so the same
code runs on CPU and CUDA); no tomography library is needed. Attenuation only sets the noise *variance* per
ray, which varies on the scale of anatomy, so it is projected from the image averaged to
``attenuation_resolution_mm`` (default 4 mm) and interpolated to the detector: 16 times cheaper at 1 mm
pixels. The back-projection of the noise runs at full resolution. Measured cost: docs/results/lowdose_cpu.md.

References:
    [1] D. Zeng et al., "A simple low-dose X-ray CT simulation from high-dose scan", IEEE Trans. Nucl. Sci.
        62(5):2226-2233, 2015.
    [2] L. Yu et al., "Development and validation of a practical lower-dose-simulation tool for optimizing
        computed tomography scan protocols", J. Comput. Assist. Tomogr. 36(4):477-487, 2012.
    [3] A. C. Kak and M. Slaney, "Principles of Computerized Tomographic Imaging", IEEE Press, 1988, ch. 3
        (the discrete Ram-Lak kernel).
    [4] J. H. Hubbell and S. M. Seltzer, "Tables of X-ray mass attenuation coefficients", NIST Standard Reference
        Database 126: water mu/rho = 0.2059 cm^2/g at 60 keV and 0.1837 cm^2/g at 80 keV.

Use in a trainer (after nnU-Net's augmentation; the teacher keeps ``data``; ``config`` is the plans' configuration,
whose "spacing" is in the patch's axis order):

    channels = ct_channels(config["normalization_schemes"])
    doses = draw_doses(batch_size, (0.1, 1.0), probability=0.5, generator=g)
    student_data = degrade_ct_channels(data, channels, intensity_properties(plans, channels), doses,
                                       config["spacing"], extra_water_mm=..., generator=g_device)
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F

# mu_water at an effective energy of ~70 keV (a 120 kVp spectrum): log-log interpolation of NIST's 60 and 80 keV
# values [4] gives 0.194 cm^2/g; times 1 g/cm^3, per mm.
MU_WATER_PER_MM = 0.0194
REFERENCE_VIEWS = 1000
# Incident photons per 1 mm x 1 mm reading of the reference scan. With it a 300 mm water cylinder at 1 mm voxels
# gets a full-dose noise of about 22 HU in its centre (Hann window), the order of a 1 mm abdominal CT; measured in
# docs/results/lowdose_cpu.md. Calibrated to that, not to a particular scanner: set i0 for yours.
DEFAULT_I0 = 1.0e5
# Electronic noise standard deviation per reference reading, in photon counts: variance 10, the level in the
# simulation code Zeng's group released with [1] (which cites Ma et al., Med. Phys. 2011, for it).
DEFAULT_ELECTRONIC_NOISE = math.sqrt(10.0)
COUNT_FLOOR = 1.0
ATTENUATION_RESOLUTION_MM = 4.0
WINDOWS = ("ram-lak", "shepp-logan", "cosine", "hann")
# Clinical soft-tissue kernels roll off high frequencies; Hann gives that texture. "ram-lak" is the sharpest.
DEFAULT_WINDOW = "hann"
CT_NORMALIZATION = "CTNormalization"

_NNZ_PER_CHUNK = 1 << 25  # entries of one back-projection matrix chunk (views are chunked beyond it)
_CACHE_NNZ = 1 << 25  # projection matrices up to this size are kept (a training patch); larger ones are rebuilt
_GROUP_ELEMENTS = 1 << 24  # sinogram samples (views x bins x slices) handled at once

Spacing = Sequence[float]


# --------------------------------------------------------------------------------------------- geometry
def _check_plane(height: int, width: int, spacing: Sequence[float]) -> tuple[float, float]:
    if height < 2 or width < 2:
        raise ValueError(f"an axial slice needs at least 2 x 2 pixels, got {height} x {width}")
    sy, sx = (float(s) for s in spacing)
    if not (sy > 0 and sx > 0):
        raise ValueError(f"pixel spacing must be > 0 mm, got {tuple(spacing)}")
    return sy, sx


def detector_bins(height: int, width: int, spacing_mm: Sequence[float]) -> tuple[int, float]:
    """(number of bins, bin width in mm) of the parallel-beam detector for a (height, width) slice: bins of the
    finer pixel spacing, centred on the slice centre, covering its diagonal with a margin of one bin."""
    sy, sx = _check_plane(height, width, spacing_mm)
    bin_mm = min(sy, sx)
    radius = 0.5 * math.hypot((height - 1) * sy, (width - 1) * sx)
    return 2 * math.ceil(radius / bin_mm) + 3, bin_mm


@contextlib.contextmanager
def _quiet_sparse() -> Iterator[None]:
    """Silences torch's notice that sparse CSR support is in beta (we only build CSR matrices and multiply them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield


def _angles(n_angles: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n_angles, device=device, dtype=torch.float64) * (math.pi / n_angles)


def _centred(n: int, step: float, device: torch.device) -> torch.Tensor:
    return (torch.arange(n, device=device, dtype=torch.float64) - (n - 1) / 2) * step


def _projector(height: int, width: int, sy: float, sx: float, n_angles: int, device: torch.device) -> torch.Tensor:
    """Sparse CSR (n_angles * n_bins, height * width): ray-driven line integrals, bilinear samples one bin width
    apart along each ray (zero outside the slice), times the step in mm."""
    n_bins, bin_mm = detector_bins(height, width, (sy, sx))
    theta = _angles(n_angles, device)
    s = _centred(n_bins, bin_mm, device)
    t = _centred(n_bins, bin_mm, device)
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    x = s[None, :, None] * cos - t[None, None, :] * sin  # (A, D, K) in mm
    y = s[None, :, None] * sin + t[None, None, :] * cos
    col, row = x / sx + (width - 1) / 2, y / sy + (height - 1) / 2
    col0, row0 = torch.floor(col), torch.floor(row)
    fc, fr = col - col0, row - row0
    ray = torch.arange(n_angles * n_bins, device=device).reshape(n_angles, n_bins, 1).expand_as(col)
    rows, cols, values = [], [], []
    for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        r, c = row0.long() + dr, col0.long() + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width) & (weight > 0)
        rows.append(ray[inside])
        cols.append((r * width + c)[inside])
        values.append(weight[inside] * bin_mm)
    matrix = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(values).float(),
                                     (n_angles * n_bins, height * width), check_invariants=False)
    with _quiet_sparse():
        return matrix.coalesce().to_sparse_csr()


def _backprojector_chunk(height: int, width: int, sy: float, sx: float, n_angles: int, first: int, last: int,
                         device: torch.device) -> torch.Tensor:
    """Sparse CSR (height * width, (last - first) * n_bins): pixel-driven back-projection of views first..last-1,
    linear interpolation between the two nearest bins, no angular weight."""
    n_bins, bin_mm = detector_bins(height, width, (sy, sx))
    theta = _angles(n_angles, device)[first:last]
    chunk = last - first
    x, y = _centred(width, sx, device), _centred(height, sy, device)
    u = (x[None, None, :] * torch.cos(theta)[:, None, None] + y[None, :, None] * torch.sin(theta)[:, None, None])
    u = (u / bin_mm + (n_bins - 1) / 2).permute(1, 2, 0)  # (H, W, chunk), bins from 1 to n_bins - 2
    u0 = torch.floor(u)
    frac = (u - u0).float()
    start = u0.long() + torch.arange(chunk, device=device) * n_bins
    cols = torch.stack([start, start + 1], -1).reshape(-1)
    values = torch.stack([1 - frac, frac], -1).reshape(-1)
    crow = torch.arange(height * width + 1, device=device) * (2 * chunk)
    with _quiet_sparse():
        return torch.sparse_csr_tensor(crow, cols, values, (height * width, chunk * n_bins), check_invariants=False)


_cached_projector = functools.lru_cache(maxsize=4)(_projector)
_cached_backprojector_chunk = functools.lru_cache(maxsize=8)(_backprojector_chunk)


def _projection_matrix(height: int, width: int, sy: float, sx: float, n_angles: int,
                       device: torch.device) -> torch.Tensor:
    """``_projector``, cached when small (at most 4 bilinear taps per ray sample)."""
    n_bins, _ = detector_bins(height, width, (sy, sx))
    build = _cached_projector if 4 * n_angles * n_bins * n_bins <= _CACHE_NNZ else _projector
    return build(height, width, sy, sx, n_angles, device)


def _backprojector_chunks(height: int, width: int, sy: float, sx: float, n_angles: int, device: torch.device):
    """(first, last, matrix) per chunk of views; cached when the whole back-projector is small."""
    per_view = 2 * height * width
    views = max(1, min(n_angles, _NNZ_PER_CHUNK // per_view))
    build = _cached_backprojector_chunk if per_view * n_angles <= _CACHE_NNZ else _backprojector_chunk
    for first in range(0, n_angles, views):
        last = min(n_angles, first + views)
        yield first, last, build(height, width, sy, sx, n_angles, first, last, device)


@functools.lru_cache(maxsize=8)
def _ramp(n_bins: int, window: str, device: torch.device) -> tuple[torch.Tensor, int]:
    """(rfft response of the discrete Ram-Lak kernel [3] times the window, padded length). In units of 1/bin: divide
    the filtered sinogram by the bin width in mm."""
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; choose one of {', '.join(WINDOWS)}")
    length = max(64, 1 << math.ceil(math.log2(2 * n_bins)))
    n = torch.arange(length, dtype=torch.float64)
    distance = torch.minimum(n, length - n)
    kernel = torch.where(distance % 2 == 1, -1.0 / (math.pi * distance.clamp(min=1)) ** 2, torch.zeros_like(n))
    kernel[0] = 0.25
    response = torch.fft.rfft(kernel).real
    r = torch.fft.rfftfreq(length, dtype=torch.float64) / 0.5  # 0 .. 1 (Nyquist)
    if window == "shepp-logan":
        response = response * torch.special.sinc(r / 2)
    elif window == "cosine":
        response = response * torch.cos(math.pi * r / 2)
    elif window == "hann":
        response = response * 0.5 * (1 + torch.cos(math.pi * r))
    return response.float().to(device), length


# ------------------------------------------------------------------------------------ projection and FBP
@torch.no_grad()
def project_parallel(image: torch.Tensor, spacing_mm: Spacing, n_angles: int) -> torch.Tensor:
    """Parallel-beam line integrals of slices over [0, pi): view theta, bin s integrates along the ray
    {s (cos theta, sin theta) + t (-sin theta, cos theta)} in (x, y) = (last axis, second-to-last axis), in mm.

    Args:
        image: (N, H, W) values per mm (e.g. attenuation 1/mm).
        spacing_mm: (row spacing, column spacing) in mm.
        n_angles: views, equally spaced over 180 degrees.

    Returns:
        (N, n_angles, n_bins) float32 sinogram; bins as in ``detector_bins`` (centre bin at s = 0).
    """
    if image.dim() != 3:
        raise ValueError(f"image must be (N, H, W), got shape {tuple(image.shape)}")
    n, height, width = image.shape
    sy, sx = _check_plane(height, width, spacing_mm)
    n_bins, _ = detector_bins(height, width, (sy, sx))
    matrix = _projection_matrix(height, width, sy, sx, int(n_angles), image.device)
    sinogram = matrix @ image.float().reshape(n, height * width).T
    return sinogram.T.reshape(n, n_angles, n_bins)


def _filter(sinogram: torch.Tensor, bin_mm: float, window: str) -> torch.Tensor:
    """Ramp-filter an (A, D, N) sinogram along its bins."""
    response, length = _ramp(sinogram.shape[1], window, sinogram.device)
    spectrum = torch.fft.rfft(sinogram, n=length, dim=1) * response[None, :, None]
    return torch.fft.irfft(spectrum, n=length, dim=1)[:, :sinogram.shape[1]] / bin_mm


def _backproject(filtered: torch.Tensor, height: int, width: int, spacing: tuple[float, float],
                 n_angles: int) -> torch.Tensor:
    """(A * D, N) ramp-filtered sinogram -> (H * W, N) image: each chunk of views' matrix is built once for all N."""
    n_bins, _ = detector_bins(height, width, spacing)
    image = torch.zeros(height * width, filtered.shape[1], device=filtered.device)
    for first, last, matrix in _backprojector_chunks(height, width, *spacing, n_angles, filtered.device):
        image += matrix @ filtered[first * n_bins:last * n_bins]
    return image * (math.pi / n_angles)


@torch.no_grad()
def fbp_parallel(sinogram: torch.Tensor, shape: Sequence[int], spacing_mm: Spacing,
                 window: str = DEFAULT_WINDOW) -> torch.Tensor:
    """Filtered back-projection of ``project_parallel``'s sinogram (N, n_angles, n_bins) to (N, H, W) slices of
    the given shape and spacing; ``window`` one of ``WINDOWS`` (ram-lak: the plain ramp)."""
    height, width = (int(v) for v in shape)
    spacing = _check_plane(height, width, spacing_mm)
    n_bins, _ = detector_bins(height, width, spacing)
    if sinogram.dim() != 3 or sinogram.shape[2] != n_bins:
        raise ValueError(f"sinogram must be (N, n_angles, {n_bins}) for {height} x {width} slices, got "
                         f"{tuple(sinogram.shape)}")
    n, n_angles = sinogram.shape[:2]
    _, bin_mm = detector_bins(height, width, spacing)
    filtered = _filter(sinogram.float().permute(1, 2, 0), bin_mm, window).reshape(n_angles * n_bins, n)
    return _backproject(filtered, height, width, spacing, n_angles).T.reshape(n, height, width)


# ------------------------------------------------------------------------------------------ low dose
def _line_integrals(mu: torch.Tensor, spacing: tuple[float, float], n_angles: int,
                    resolution_mm: float) -> torch.Tensor:
    """(N, H, W) attenuation -> (A, D, N) line integrals on the full-resolution detector and views. Attenuation
    varies slowly in space and angle, so the slices are averaged to about ``resolution_mm`` pixels, projected
    over as many views as the averaged slice has pixels across (at most A), and interpolated linearly along bins
    and views (across 180 degrees with p(pi, s) = p(0, -s))."""
    n, height, width = mu.shape
    n_bins, bin_mm = detector_bins(height, width, spacing)
    factor = max(1, int(resolution_mm // min(spacing)))
    low_h, low_w = max(2, math.ceil(height / factor)), max(2, math.ceil(width / factor))
    if (low_h, low_w) != (height, width):
        mu = F.adaptive_avg_pool2d(mu[:, None], (low_h, low_w))[:, 0]
        spacing = (spacing[0] * height / low_h, spacing[1] * width / low_w)
    low_views = min(n_angles, max(low_h, low_w))
    low_bins, low_bin_mm = detector_bins(low_h, low_w, spacing)
    matrix = _projection_matrix(low_h, low_w, *spacing, low_views, mu.device)
    p = (matrix @ mu.reshape(n, low_h * low_w).T).reshape(low_views, low_bins, n)
    if (low_bins, low_bin_mm) != (n_bins, bin_mm):
        position = _centred(n_bins, bin_mm, mu.device) / low_bin_mm + (low_bins - 1) / 2
        p = _interpolate(p, position, 1)
    if low_views != n_angles:
        position = torch.arange(n_angles, device=mu.device, dtype=torch.float64) * (low_views / n_angles)
        p = _interpolate(torch.cat([p, p[:1].flip(1)]), position, 0)  # the view at 180 degrees closes the loop
    return p


def _interpolate(values: torch.Tensor, position: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear interpolation of ``values`` along ``dim`` at fractional indices ``position``; 0 outside."""
    size = values.shape[dim]
    left = torch.floor(position).clamp(0, size - 2)
    shape = [1] * values.dim()
    shape[dim] = -1
    frac = (position - left).clamp(0, 1).float().reshape(shape)
    outside = ((position < 0) | (position > size - 1)).reshape(shape)
    left = left.long()
    result = values.index_select(dim, left) * (1 - frac) + values.index_select(dim, left + 1) * frac
    return result.masked_fill(outside, 0.0)


def _log_noise(slices: torch.Tensor, a: torch.Tensor, plane: tuple[float, float], views: int, readings: float,
               i0: float, electronic_noise: float, extra_water_mm: float, resolution_mm: float,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """p_a - p, (A, D, N), for (N, H, W) slices in HU at dose fractions a (1, 1, N) (module docstring, 1-3)."""
    mu = (MU_WATER_PER_MM * (1 + slices / 1000)).clamp(min=0)
    p = _line_integrals(mu, plane, views, resolution_mm) + MU_WATER_PER_MM * extra_water_mm
    counts = torch.round(i0 * readings * torch.exp(-p)).clamp(min=1)  # the full-dose reading
    kept = torch.binomial(counts, a.expand_as(counts).contiguous(), generator=generator)
    if electronic_noise > 0:
        std = electronic_noise * math.sqrt(readings) * torch.sqrt(1 - a * a)
        kept = kept + std * torch.randn(counts.shape, device=slices.device, generator=generator)
    return torch.log(a * counts / kept.clamp(min=COUNT_FLOOR))


@torch.no_grad()
def simulate_low_dose(hu: torch.Tensor, dose: Union[float, torch.Tensor], spacing_mm: Spacing,
                      i0: float = DEFAULT_I0, electronic_noise: float = DEFAULT_ELECTRONIC_NOISE,
                      n_angles: Optional[int] = None, generator: Optional[torch.Generator] = None, *,
                      window: str = DEFAULT_WINDOW, extra_water_mm: float = 0.0, slice_mm: Optional[float] = None,
                      attenuation_resolution_mm: float = ATTENUATION_RESOLUTION_MM) -> torch.Tensor:
    """The scan at a fraction of its dose: ``hu`` plus the reconstructed noise of the dose difference (module
    docstring). A new tensor; ``hu`` is never modified.

    Args:
        hu: (B, *spatial) CT in Hounsfield units, 2 spatial axes (one slice per sample) or 3 (slices along the
            first); the projection plane is the last two axes. Any float dtype, any device.
        dose: dose fraction a in (0, 1] relative to the scan, one for all or a (B,) tensor; samples at 1 are
            returned unchanged (no projection computed for them).
        spacing_mm: the spacing of every spatial axis of ``hu`` in mm, in its order (nnU-Net's configuration
            "spacing"): 2 or 3 values.
        i0: incident photons per 1 mm x 1 mm reading of a ``REFERENCE_VIEWS``-view full-dose scan (module docstring).
        electronic_noise: electronic noise standard deviation per reference reading, in counts; 0 switches it off.
        n_angles: views over 180 degrees; None: the larger slice side in pixels (noise variance does not depend on
            it; fewer views make the finest noise texture streakier far from the centre and cost less).
        generator: torch.Generator on ``hu``'s device, for reproducible noise; None: torch's global generator.
        window: ramp filter window, one of ``WINDOWS``.
        extra_water_mm: water path added to every ray, for the body around a patch (0 for whole slices).
        slice_mm: detector row width (slice thickness) in mm; None: the first spacing of a 3-D input, 1 mm for 2-D.
        attenuation_resolution_mm: pixel size at which attenuation is projected for the noise variance.

    Returns:
        Tensor of ``hu``'s shape, dtype and device, in HU.

    Raises:
        ValueError: dose outside (0, 1] or not one per sample, spacing of the wrong length, slices under 2 x 2
            pixels, a negative setting, an unknown window, a generator on another device.
    """
    spatial = hu.dim() - 1
    if spatial not in (2, 3):
        raise ValueError(f"hu must be (B, H, W) or (B, Z, H, W), got shape {tuple(hu.shape)}")
    if len(spacing_mm) != spatial:
        raise ValueError(f"spacing_mm must give the spacing of all {spatial} spatial axes of hu (shape "
                         f"{tuple(hu.shape)}), got {tuple(spacing_mm)}")
    if i0 <= 0 or electronic_noise < 0 or extra_water_mm < 0 or attenuation_resolution_mm < 0:
        raise ValueError(f"need i0 > 0, electronic_noise >= 0, extra_water_mm >= 0, attenuation_resolution_mm >= 0; "
                         f"got {i0}, {electronic_noise}, {extra_water_mm}, {attenuation_resolution_mm}")
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; choose one of {', '.join(WINDOWS)}")
    if generator is not None and generator.device.type != hu.device.type:
        raise ValueError(f"the generator is on {generator.device}, hu on {hu.device}: create it there "
                         f"(torch.Generator(device=hu.device))")
    batch = hu.shape[0]
    doses = torch.as_tensor(dose, dtype=torch.float64).flatten().cpu()
    if doses.numel() == 1:
        doses = doses.expand(batch)
    if doses.numel() != batch:
        raise ValueError(f"dose must be one number or one per sample ({batch}), got {doses.numel()}")
    if not bool(((doses > 0) & (doses <= 1)).all()):
        raise ValueError(f"dose fractions must be in (0, 1] (relative to the scan; noise cannot be removed), got "
                         f"{doses.tolist()}")
    out = hu.clone()
    chosen = torch.nonzero(doses < 1).flatten()
    if chosen.numel() == 0:
        return out
    height, width = hu.shape[-2:]
    plane = _check_plane(height, width, spacing_mm[-2:])
    thickness = float(slice_mm) if slice_mm is not None else (float(spacing_mm[0]) if spatial == 3 else 1.0)
    if thickness <= 0:
        raise ValueError(f"slice_mm must be > 0, got {thickness}")
    views = int(n_angles) if n_angles is not None else max(height, width)
    if views < 1:
        raise ValueError(f"n_angles must be >= 1, got {n_angles}")
    n_bins, bin_mm = detector_bins(height, width, plane)
    device = hu.device

    index = chosen.to(device)
    slices = hu.index_select(0, index).float().reshape(-1, height, width)  # (N, H, W)
    per_sample = slices.shape[0] // chosen.numel()
    a = doses[chosen].repeat_interleave(per_sample).float().to(device)[None, None, :]  # (1, 1, N)

    readings = bin_mm * thickness * REFERENCE_VIEWS / views  # reference readings per simulated reading
    filtered = torch.empty(views * n_bins, slices.shape[0], device=device)
    group = max(1, _GROUP_ELEMENTS // (views * n_bins))
    for first in range(0, slices.shape[0], group):
        last = min(first + group, slices.shape[0])
        noise = _log_noise(slices[first:last], a[..., first:last], plane, views, readings, i0, electronic_noise,
                           extra_water_mm, attenuation_resolution_mm, generator)
        filtered[:, first:last] = _filter(noise, bin_mm, window).reshape(views * n_bins, last - first)
    hu_noise = _backproject(filtered, height, width, plane, views) * (1000.0 / MU_WATER_PER_MM)  # (H * W, N)
    degraded = slices + hu_noise.T.reshape(slices.shape)
    out[index] = degraded.reshape((chosen.numel(),) + tuple(hu.shape[1:])).to(hu.dtype)
    return out


# -------------------------------------------------------------------------- nnU-Net's CT normalisation
def _bounds(props: Mapping[str, float]) -> tuple[float, float, float, float]:
    missing = [k for k in ("percentile_00_5", "percentile_99_5", "mean", "std") if k not in props]
    if missing:
        raise KeyError(f"intensity properties lack {', '.join(missing)}: pass the plans' "
                       f"foreground_intensity_properties_per_channel[str(channel)]")
    return (float(props["percentile_00_5"]), float(props["percentile_99_5"]), float(props["mean"]),
            max(float(props["std"]), 1e-8))


def ct_normalised_from_hu(hu: torch.Tensor, props: Mapping[str, float]) -> torch.Tensor:
    """nnU-Net's CTNormalization: clip to [percentile_00_5, percentile_99_5], then (x - mean) / max(std, 1e-8)."""
    lower, upper, mean, std = _bounds(props)
    return (hu.clamp(lower, upper) - mean) / std


def hu_from_ct_normalised(x: torch.Tensor, props: Mapping[str, float]) -> torch.Tensor:
    """Inverse of ``ct_normalised_from_hu`` inside the clip range: x * max(std, 1e-8) + mean. Values nnU-Net clipped
    come back at the bounds (the air around a body typically as percentile_00_5), so attenuation outside the
    clip range, and with it the noise level, is only approximate; the image content inside it is exact."""
    _, _, mean, std = _bounds(props)
    return x * std + mean


def ct_channels(normalization_schemes: Sequence[str]) -> list[int]:
    """Channels whose nnU-Net normalization scheme is CTNormalization (a configuration's "normalization_schemes")."""
    return [c for c, scheme in enumerate(normalization_schemes) if scheme == CT_NORMALIZATION]


def intensity_properties(plans: Mapping, channels: Sequence[int]) -> dict[int, dict]:
    """The plans' foreground intensity properties of the given channels, keyed by channel number."""
    table = plans.get("foreground_intensity_properties_per_channel", {})
    missing = [c for c in channels if str(c) not in table]
    if missing:
        raise KeyError(f"the plans have no foreground_intensity_properties_per_channel for channel(s) {missing}")
    return {int(c): dict(table[str(c)]) for c in channels}


@torch.no_grad()
def degrade_ct_channels(data: torch.Tensor, channels: Sequence[int], props_per_channel: Mapping[int, Mapping],
                        doses: torch.Tensor, spacing_mm: Spacing, i0: float = DEFAULT_I0,
                        electronic_noise: float = DEFAULT_ELECTRONIC_NOISE, n_angles: Optional[int] = None,
                        generator: Optional[torch.Generator] = None, *, window: str = DEFAULT_WINDOW,
                        extra_water_mm: float = 0.0, slice_mm: Optional[float] = None,
                        attenuation_resolution_mm: float = ATTENUATION_RESOLUTION_MM) -> torch.Tensor:
    """A low-dose copy of an nnU-Net batch: the CT channels go back to HU, through ``simulate_low_dose`` and through
    CTNormalization again; other channels, and samples at dose 1, are copied unchanged. ``data`` is never
    modified (it stays the teacher's input). Each CT channel gets its own noise (separate scans).

    Args:
        data: (B, C, *spatial) normalised batch (2 or 3 spatial axes).
        channels: the CT channels (see ``ct_channels``).
        props_per_channel: channel -> the plans' intensity properties of it (see ``intensity_properties``).
        doses: (B,) dose fractions in (0, 1] (see ``draw_doses``).
        spacing_mm, i0, electronic_noise, n_angles, generator, window, extra_water_mm, slice_mm,
        attenuation_resolution_mm: as for ``simulate_low_dose``.

    Returns:
        A new tensor shaped like ``data``.

    Raises:
        ValueError: a channel out of range, doses not (B,); KeyError: properties missing for a CT channel.
    """
    if data.dim() not in (4, 5):
        raise ValueError(f"data must be (B, C, *spatial) with 2 or 3 spatial axes, got shape {tuple(data.shape)}")
    bad = [c for c in channels if not 0 <= int(c) < data.shape[1]]
    if bad:
        raise ValueError(f"channel(s) {bad} out of range for {data.shape[1]} input channel(s)")
    doses = torch.as_tensor(doses).flatten()
    if doses.numel() != data.shape[0]:
        raise ValueError(f"doses must be (B,) = ({data.shape[0]},), got shape {tuple(doses.shape)}")
    out = data.clone()
    chosen = torch.nonzero(doses.cpu() < 1).flatten()
    if chosen.numel() == 0:
        return out
    index = chosen.to(data.device)
    for c in channels:
        if int(c) not in props_per_channel:
            raise KeyError(f"no intensity properties for CT channel {c}")
        props = props_per_channel[int(c)]
        hu = hu_from_ct_normalised(data[:, int(c)].index_select(0, index).float(), props)
        low = simulate_low_dose(hu, doses.cpu()[chosen], spacing_mm, i0, electronic_noise, n_angles, generator,
                                window=window, extra_water_mm=extra_water_mm, slice_mm=slice_mm,
                                attenuation_resolution_mm=attenuation_resolution_mm)
        out[index, int(c)] = ct_normalised_from_hu(low, props).to(data.dtype)
    return out


def draw_doses(batch_size: int, dose: Union[float, Sequence[float]], probability: float = 1.0,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Dose fraction per sample, (batch_size,) float32 on the CPU: with ``probability`` a dose, else 1.0 (clean).

    ``dose`` is one fraction or a range (lo, hi) in (0, 1], drawn log-uniformly (each halving of the dose equally
    likely; the added noise variance grows like 1/a - 1, so a uniform draw would rarely visit the low doses).
    ``generator``: a CPU torch.Generator for reproducible draws.
    """
    if not 0 <= probability <= 1:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    lo, hi = (float(dose), float(dose)) if isinstance(dose, (int, float)) else (float(v) for v in dose)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"dose must be a fraction or a range (lo, hi) with 0 < lo <= hi <= 1, got {dose}")
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    drawn = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    applied = torch.rand(batch_size, generator=generator, dtype=torch.float64) < probability
    return torch.where(applied, drawn, torch.ones_like(drawn)).float()
