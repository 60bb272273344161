"""The brain phantom: a skull-stripped T1-like head, 2D (an axial slice) or 3D.

Axes: axis 0 = left -> right (x), axis 1 = posterior -> anterior (y), axis 2 = inferior ->
superior (z); a 2D brain is an axial slice (x, y) through the deep grey nuclei. Geometry is in mm
relative to the grid centre (:mod:`inrseg.data.phantoms`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from inrseg.data.phantoms.fields import (ellipsoid, normalised, random_grid, rotation, sample_lattice,
                                         voxel_centres_mm)

__all__ = ["BRAIN_LABELS", "brain_phantom", "brain_spacing"]

BRAIN_LABELS: dict[str, int] = {
    "background": 0,
    "cortex": 1,
    "subcortical-grey-matter": 2,
    "white-matter": 3,
    "csf": 4,
}

# Reference anatomy (mm). 3D values; a 2D phantom uses the (x, y) entries (an axial slice).
_BRAIN_RADII = (67.0, 83.0, 57.0)  # pial envelope semi-axes (left-right, ant.-post., inf.-sup.)
_BRAIN_FOV = (150.0, 184.0, 136.0)  # field of view used to choose the spacing when spacing=None
_CORTEX_MM = 2.6  # cortical thickness
_OUTER_CSF_MM = 1.6  # subarachnoid CSF layer outside the pial envelope
_SULCUS_DEPTH_MM = 20.0  # maximal depth of a sulcus (below the WM crown level)
_SULCUS_HALF_WIDTH_MM = 4.5  # half-width of the white-matter groove of a sulcus
_FOLD_SIGMA_MM = 3.5  # correlation length of the folding field (sets the gyral wavelength)
_LATTICE_HALF_MM = 110.0  # random lattices cover [-110, 110] mm
#: Deep structures: (label, centre mm, radii mm, in-plane tilt rad, mirrored left/right).
_DEEP = (
    # lateral ventricles ("banana" shaped, see _brain_labels), then grey nuclei, then 3rd ventricle
    ("thalamus", 2, (10.5, -13.0, -6.0), (8.5, 13.5, 10.0), 0.0),
    ("lentiform", 2, (24.0, 3.0, -8.0), (5.5, 15.0, 11.0), 0.28),
    ("caudate", 2, (15.5, 17.0, -1.0), (5.0, 8.0, 10.0), 0.35),
)
_TISSUE_MEANS = {1: 0.25, 2: 0.30, 3: 0.38, 4: 0.20}  # T1-weighted means per label


def brain_phantom(
    shape: tuple[int, ...], seed: int, spacing: tuple[float, ...] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Skull-stripped T1-like brain phantom, 2D (an axial slice) or 3D.

    Parameters
    ----------
    shape:
        ``(H, W)`` = (left-right, posterior-anterior), e.g. ``(160, 192)``; or ``(X, Y, Z)``
        = (left-right, posterior-anterior, inferior-superior), e.g. ``(80, 96, 112)``.
    seed:
        Subject id. Same seed -> bit-identical arrays; different seeds -> different subjects.
    spacing:
        Voxel size in mm per axis. ``None`` picks the isotropic spacing at which the head fills
        the grid (field of view ~150 x 184 x 136 mm), so that ``2 * shape`` samples the same
        anatomy twice as finely. Anatomy is always defined in mm, so anisotropic spacings keep
        physical shapes right.

    Returns
    -------
    image:
        float32 array of ``shape``; T1-like intensities roughly in [0, 0.6] (white matter ~0.38,
        subcortical grey ~0.30, cortex ~0.25, CSF ~0.20), with partial-volume blur, a smooth
        multiplicative bias field (+-10 %) and Gaussian noise (std 0.01) inside the head mask;
        exactly 0 outside the (skull-stripped) head.
    labels:
        uint8 array of ``shape`` with the values of :data:`BRAIN_LABELS`.

    The cortex is a folded ribbon of ~2.6 mm thickness around a white-matter surface whose
    sulci follow the nodal lines of a band-limited random field (gyral width ~10-15 mm), plus an
    interhemispheric fissure. CSF fills the sulci, a thin layer outside the pial envelope and the
    ventricles.
    """
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if ndim not in (2, 3):
        raise ValueError(f"brain_phantom needs a 2D or 3D shape, got {shape}")
    if spacing is None:
        spacing = brain_spacing(shape)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing {spacing} does not match shape {shape}")

    rng = np.random.default_rng(seed)
    labels, head = _brain_labels(shape, spacing, rng)
    image = _brain_image(labels, head, spacing, rng)
    return image, labels


def _brain_labels(
    shape: tuple[int, ...], spacing: tuple[float, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Label map (uint8, ``shape``) and head mask (bool, ``shape``) of one subject."""
    ndim = len(shape)
    # ---- per-subject scalars (fixed draw order, independent of the grid) -------------------
    radii = np.array(_BRAIN_RADII[:ndim]) * (1.0 + 0.04 * rng.standard_normal(ndim))
    radii *= 1.0 + 0.03 * rng.standard_normal()  # global head size
    egg = 0.07 + 0.02 * rng.standard_normal()  # posterior widening of the envelope
    shift = 2.5 * rng.standard_normal(ndim)  # mm
    angles = np.deg2rad([4.0, 3.0, 3.0]) * rng.standard_normal(3)
    cortex_mm = _CORTEX_MM * (1.0 + 0.06 * rng.standard_normal())
    sulcus_depth = _SULCUS_DEPTH_MM * (1.0 + 0.1 * rng.standard_normal())
    deep_scale = 1.0 + 0.06 * rng.standard_normal()
    vent_scale = 1.0 + 0.15 * rng.standard_normal()  # ventricle size varies a lot (age/atrophy)
    deep_jitter = 1.5 * rng.standard_normal((len(_DEEP), 2, 3))  # mm, per structure and side
    vent_jitter = 1.0 * rng.standard_normal((2, 3))
    # ---- random lattices --------------------------------------------------------------------
    deform_lat = random_grid(rng, ndim, _LATTICE_HALF_MM, 40.0, ndim)  # displacement
    depth_lat = random_grid(rng, ndim, _LATTICE_HALF_MM, 25.0, 1)[0]  # sulcal depth modulation
    fold_lat = random_grid(rng, ndim, _LATTICE_HALF_MM, 2.0, 2)  # folding (white noise)

    # ---- anatomical coordinates q (mm) of every voxel ---------------------------------------
    p = voxel_centres_mm(shape, spacing)
    rot = rotation(ndim, angles if ndim == 3 else angles[:1])
    q = [sum(rot[i, j] * (p[j] - shift[j]) for j in range(ndim)) for i in range(ndim)]
    q = [np.broadcast_to(qi, shape) for qi in q]
    # smooth random deformation: ~3 mm std, 40 mm control spacing (cubic B-spline)
    q = [qi + 3.0 * sample_lattice(deform_lat[i], _LATTICE_HALF_MM, p, order=3) for i, qi in enumerate(q)]

    # ---- pial envelope: depth below an egg-shaped ellipsoid surface (mm, >0 inside) ---------
    widen = 1.0 - egg * q[1] / radii[1]  # wider posteriorly
    u = [q[0] / widen] + q[1:]
    rho = np.sqrt(sum((ui / ri) ** 2 for ui, ri in zip(u, radii)))
    grad = np.sqrt(sum((ui / ri**2) ** 2 for ui, ri in zip(u, radii)))
    depth = (1.0 - rho) * rho / np.maximum(grad, 1e-9)  # first-order distance to the surface

    # ---- folding: sulci along the nodal lines/surfaces of a band-limited random field ------
    sig = _FOLD_SIGMA_MM / 2.0  # in lattice steps (2 mm)
    f_a = ndi.gaussian_filter(fold_lat[0], sig)
    f_b = ndi.gaussian_filter(fold_lat[1], sig)
    fold = f_a + f_a[::-1] + f_b  # partly left-right symmetric
    gnorm = np.sqrt(sum(g**2 for g in np.gradient(fold, 2.0)))
    nodal_dist = fold / (gnorm + 1e-6 * gnorm.max())  # ~ signed distance (mm) to the nodal set
    nodal = sample_lattice(nodal_dist, _LATTICE_HALF_MM, q, order=1)
    depth_mod = np.clip(0.9 + 0.3 * sample_lattice(depth_lat, _LATTICE_HALF_MM, q, order=3), 0.5, 1.2)
    # compactly supported (biweight) groove profile: V/U-shaped sulci, flat gyral crowns
    profile = np.clip(1.0 - (nodal / _SULCUS_HALF_WIDTH_MM) ** 2, 0.0, None) ** 2
    groove = sulcus_depth * depth_mod * profile
    # interhemispheric fissure: a deep midline groove, blocked around the ventricles (corpus
    # callosum, septum, diencephalon) and, in 3D, absent at the base of the brain
    callosal = ((q[1] + 4.0) / 36.0) ** 2 + (((q[2] + 2.0) / 22.0) ** 2 if ndim == 3 else 0.0)
    fissure = 60.0 * np.clip(1.0 - (q[0] / 5.0) ** 2, 0.0, None) ** 2
    fissure = fissure * np.clip((np.sqrt(callosal) - 1.0) / 0.1, 0.0, 1.0)
    if ndim == 3:
        fissure = fissure / (1.0 + np.exp(-(q[2] + 20.0) / 3.0))
    crown = cortex_mm + 0.4  # WM crown depth below the pial envelope
    wm = depth > crown + np.maximum(groove, fissure)

    # ---- cortex: ribbon of constant thickness outside WM, inside the pial envelope ----------
    dist = ndi.distance_transform_edt(~wm, sampling=spacing)
    # EDT measures to voxel centres: +half a voxel is the unbiased distance to the surface
    cortex = (~wm) & (dist <= cortex_mm + 0.5 * float(np.mean(spacing))) & (depth > 0)
    head = depth > -_OUTER_CSF_MM

    labels = np.zeros(shape, np.uint8)
    labels[head] = BRAIN_LABELS["csf"]
    labels[cortex] = BRAIN_LABELS["cortex"]
    labels[wm] = BRAIN_LABELS["white-matter"]

    # ---- deep structures ----------------------------------------------------------------
    def local(centre: np.ndarray, tilt: float) -> list[np.ndarray]:
        """Coordinates relative to ``centre``, rotated by ``tilt`` in the axial plane."""
        d = [qi - ci for qi, ci in zip(q, centre)]
        c, s = np.cos(tilt), np.sin(tilt)
        return [c * d[0] + s * d[1], -s * d[0] + c * d[1]] + d[2:]

    csf = BRAIN_LABELS["csf"]
    for side, sgn in enumerate((-1.0, 1.0)):  # lateral ventricles: bent (banana) ellipsoids
        c = np.array([sgn * 5.5, -4.0, 3.0]) + vent_jitter[side]
        y = q[1] - c[1]
        # medial wall along the septum; frontal horn widens anteriorly, atrium/occipital horn
        # bends laterally posteriorly (butterfly shape in axial and coronal views)
        widen_front = 0.16 * np.maximum(y, 0.0)
        rx = 4.0 * vent_scale * (1.0 + 0.4 * np.exp(-0.5 * ((y + 20.0) / 7.0) ** 2)) + widen_front
        bend = 0.009 * np.minimum(y, 0.0) ** 2 + widen_front
        ell = ((q[0] - c[0]) * sgn - bend) ** 2 / rx**2 + (y / (27.0 * deep_scale)) ** 2
        if ndim == 3:
            ell = ell + ((q[2] - c[2]) / (8.0 * vent_scale)) ** 2
        vent = ell < 1.0
        labels[vent] = csf
    for k, (_, lab, centre, rad, tilt) in enumerate(_DEEP):
        for side, sgn in enumerate((-1.0, 1.0)):
            c = np.array(centre) * np.array([sgn, 1.0, 1.0]) + deep_jitter[k, side]
            radii_k = np.array(rad[:ndim]) * deep_scale
            mask = ellipsoid(local(c[:ndim], -sgn * tilt), [0.0] * ndim, radii_k)
            labels[mask] = lab
    third = ellipsoid(q, (0.0, -10.0, -8.0)[:ndim], (1.6 * vent_scale, 10.0, 8.0)[:ndim])
    labels[third] = csf
    return labels, head


def _brain_image(
    labels: np.ndarray, head: np.ndarray, spacing: tuple[float, ...], rng: np.random.Generator
) -> np.ndarray:
    """T1-like image (float32, ``labels.shape``) from a label map: means, blur, bias, noise."""
    ndim = labels.ndim
    lut = np.zeros(256, np.float32)
    for lab, mean in _TISSUE_MEANS.items():
        lut[lab] = mean * (1.0 + 0.03 * rng.standard_normal())
    bias_lat = random_grid(rng, ndim, _LATTICE_HALF_MM, 45.0, 1)[0]
    image = ndi.gaussian_filter(lut[labels], 0.6)  # partial-volume / point-spread blur (voxels)
    p = voxel_centres_mm(labels.shape, spacing)
    bias = 1.0 + 0.1 * normalised(sample_lattice(bias_lat, _LATTICE_HALF_MM, p, order=3))
    image *= bias.astype(np.float32)
    image += 0.01 * rng.standard_normal(labels.shape, dtype=np.float32)
    mask = ndi.binary_dilation(head)  # skull stripping with a one-voxel margin
    image[~mask] = 0.0
    return np.clip(image, 0.0, None, out=image)


def brain_spacing(shape: Sequence[int]) -> tuple[float, ...]:
    """Isotropic spacing (mm) at which the brain phantom's field of view fills ``shape``."""
    iso = max(f / n for f, n in zip(_BRAIN_FOV[: len(shape)], shape))
    return (iso,) * len(shape)
