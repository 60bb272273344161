"""Deterministic synthetic phantoms: a folded brain (2D/3D) and a 3D+t cardiac short-axis cine.

These are the embedded default data of the library (demo, tests, smoke benchmarks). They are not
meant to be anatomically exact, but to have the properties that matter for segmentation methods:
realistic topology (a thin folded cortical ribbon, nested structures, a ring-shaped myocardium),
realistic intensity statistics (tissue contrast, partial volume, bias field, noise) and a
per-subject shape variability.

Conventions
-----------
* All geometry is defined in continuous physical coordinates (millimetres), relative to the
  centre of the sampling grid. A grid with twice as many voxels and half the spacing samples the
  *same* subject, only finer. Voxel ``i`` along an axis with ``n`` voxels and spacing ``s`` has its
  centre at ``(i - (n - 1) / 2) * s`` mm.
* Brain axes: axis 0 = left -> right (x), axis 1 = posterior -> anterior (y), axis 2 =
  inferior -> superior (z). A 2D brain is an axial slice (x, y) through the deep grey nuclei.
* Cardiac axes: (x, y) = short-axis plane, axis 2 = slice index from the **base** (index 0) to the
  **apex** (index Z-1), axis 3 = cardiac phase, frame 0 = end-diastole.
* Everything is drawn from ``np.random.default_rng(seed)`` in a fixed order that does not depend
  on the grid, so the same seed gives bit-identical arrays and the same anatomy at any resolution.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from inrseg.data.io import Volume, make_dir_public, save_image, save_labels
from inrseg.core.progress import progress

__all__ = ["BRAIN_LABELS", "CARDIAC_LABELS", "brain_phantom", "cardiac_phantom"]

BRAIN_LABELS: dict[str, int] = {
    "background": 0,
    "cortex": 1,
    "subcortical-grey-matter": 2,
    "white-matter": 3,
    "csf": 4,
}
CARDIAC_LABELS: dict[str, int] = {
    "background": 0,
    "lv-blood-pool": 1,
    "lv-myocardium": 2,
    "rv-blood-pool": 3,
}

# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def _voxel_centres_mm(shape: Sequence[int], spacing: Sequence[float]) -> list[np.ndarray]:
    """Open (broadcastable) grids of voxel-centre coordinates in mm, centred on the grid centre.

    Returns ``len(shape)`` arrays; array ``k`` has shape ``(1, .., n_k, .., 1)``.
    """
    axes = [(np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    return list(np.ix_(*axes))


def _random_grid(
    rng: np.random.Generator, ndim: int, half_extent_mm: float, step_mm: float, n_fields: int = 1
) -> np.ndarray:
    """White Gaussian noise on a fixed physical lattice covering ``[-half_extent, half_extent]^ndim``.

    Returns float64 array of shape ``(n_fields, m, ..., m)`` with ``m = 2 * round(half/step) + 1``
    (odd, so that the lattice is symmetric about 0). Its size never depends on the sampling grid,
    which is what makes the phantoms resolution independent.
    """
    m = 2 * int(round(half_extent_mm / step_mm)) + 1
    return rng.standard_normal((n_fields,) + (m,) * ndim)


def _sample(
    lattice: np.ndarray, half_extent_mm: float, points_mm: Sequence[np.ndarray], order: int
) -> np.ndarray:
    """Interpolate a field given on the symmetric lattice of :func:`_random_grid` at points (mm).

    ``lattice``: shape ``(m,) * d``; ``points_mm``: ``d`` arrays that broadcast to a common shape
    ``S``. Returns float64 array of shape ``S`` (constant extrapolation outside the lattice).
    """
    m = lattice.shape[0]
    pts = np.broadcast_arrays(*points_mm)
    scale = (m - 1) / (2.0 * half_extent_mm)
    idx = np.stack([(p + half_extent_mm) * scale for p in pts]).reshape(len(pts), -1)
    out = ndi.map_coordinates(lattice, idx, order=order, mode="nearest", prefilter=order > 1)
    return out.reshape(pts[0].shape)


def _rotation(ndim: int, angles_rad: Sequence[float]) -> np.ndarray:
    """Rotation matrix: 2D -> angle[0] about the normal; 3D -> x-y-z Euler angles (rad)."""
    if ndim == 2:
        c, s = np.cos(angles_rad[0]), np.sin(angles_rad[0])
        return np.array([[c, -s], [s, c]])
    rot = np.eye(3)
    for axis, a in enumerate(angles_rad[:3]):
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        rot = r @ rot
    return rot


def _ellipsoid(q: Sequence[np.ndarray], centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Boolean mask of the (axis aligned) ellipsoid ``sum(((q - c) / r)^2) < 1`` over ``len(q)`` dims."""
    return sum(((qi - ci) / ri) ** 2 for qi, ci, ri in zip(q, centre, radii)) < 1.0


def _normalised(field: np.ndarray) -> np.ndarray:
    """Rescale a field to zero mean and max |value| = 1."""
    field = field - field.mean()
    return field / max(float(np.abs(field).max()), 1e-12)


# --------------------------------------------------------------------------------------------
# brain
# --------------------------------------------------------------------------------------------

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
    deform_lat = _random_grid(rng, ndim, _LATTICE_HALF_MM, 40.0, ndim)  # displacement
    depth_lat = _random_grid(rng, ndim, _LATTICE_HALF_MM, 25.0, 1)[0]  # sulcal depth modulation
    fold_lat = _random_grid(rng, ndim, _LATTICE_HALF_MM, 2.0, 2)  # folding (white noise)

    # ---- anatomical coordinates q (mm) of every voxel ---------------------------------------
    p = _voxel_centres_mm(shape, spacing)
    rot = _rotation(ndim, angles if ndim == 3 else angles[:1])
    q = [sum(rot[i, j] * (p[j] - shift[j]) for j in range(ndim)) for i in range(ndim)]
    q = [np.broadcast_to(qi, shape) for qi in q]
    # smooth random deformation: ~3 mm std, 40 mm control spacing (cubic B-spline)
    q = [qi + 3.0 * _sample(deform_lat[i], _LATTICE_HALF_MM, p, order=3) for i, qi in enumerate(q)]

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
    nodal = _sample(nodal_dist, _LATTICE_HALF_MM, q, order=1)
    depth_mod = np.clip(0.9 + 0.3 * _sample(depth_lat, _LATTICE_HALF_MM, q, order=3), 0.5, 1.2)
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
            mask = _ellipsoid(local(c[:ndim], -sgn * tilt), [0.0] * ndim, radii_k)
            labels[mask] = lab
    third = _ellipsoid(q, (0.0, -10.0, -8.0)[:ndim], (1.6 * vent_scale, 10.0, 8.0)[:ndim])
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
    bias_lat = _random_grid(rng, ndim, _LATTICE_HALF_MM, 45.0, 1)[0]
    image = ndi.gaussian_filter(lut[labels], 0.6)  # partial-volume / point-spread blur (voxels)
    p = _voxel_centres_mm(labels.shape, spacing)
    bias = 1.0 + 0.1 * _normalised(_sample(bias_lat, _LATTICE_HALF_MM, p, order=3))
    image *= bias.astype(np.float32)
    image += 0.01 * rng.standard_normal(labels.shape, dtype=np.float32)
    mask = ndi.binary_dilation(head)  # skull stripping with a one-voxel margin
    image[~mask] = 0.0
    return np.clip(image, 0.0, None, out=image)


# --------------------------------------------------------------------------------------------
# cardiac
# --------------------------------------------------------------------------------------------


def cardiac_phantom(
    shape: tuple[int, int, int] = (96, 96, 10),
    frames: int = 12,
    seed: int = 0,
    spacing: tuple[float, float, float] = (1.8, 1.8, 8.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Short-axis cine (3D+t, bSSFP-like) of a beating left and right ventricle.

    Parameters
    ----------
    shape:
        ``(X, Y, Z)``: in-plane size and number of short-axis slices. Slice 0 is the most basal,
        slice ``Z - 1`` the most apical.
    frames:
        Number of cardiac phases ``T``, evenly covering one cycle; frame 0 = end-diastole,
        end-systole at ~35 % of the cycle.
    seed:
        Subject id (heart size, position, in-plane rotation, wall thickness, ejection fraction,
        RV size, surrounding texture). Same seed -> bit-identical arrays.
    spacing:
        Voxel size in mm (in-plane x, in-plane y, slice distance). Geometry is defined in mm.

    Returns
    -------
    image:
        float32 array ``(X, Y, Z, T)`` in [0, 1]: bright blood (~0.8), dark myocardium (~0.3),
        textured surrounding tissue (~0.45), dark lungs, bright epicardial fat and descending
        aorta; in-plane blur, smooth bias field, Rician noise (sigma 0.02).
    labels:
        uint8 array ``(X, Y, Z, T)`` with the values of :data:`CARDIAC_LABELS`. The RV free wall,
        papillary muscles, fat, aorta and lungs appear in the image only (labelled background or,
        for the papillary muscles, LV blood pool, as in the usual cine annotation protocols).
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or frames < 1:
        raise ValueError(f"cardiac_phantom needs shape (X, Y, Z) and frames >= 1: {shape}, {frames}")
    sx, sy, sz = (float(s) for s in spacing)
    rng = np.random.default_rng(seed)

    # ---- per-subject parameters (mm), fixed draw order --------------------------------------
    size = 1.0 + 0.08 * rng.standard_normal()
    r_endo_ed = 25.0 * size  # basal LV cavity radius at end-diastole
    wall = float(np.clip(8.0 + 0.8 * rng.standard_normal(), 6.0, 10.0))  # myocardial thickness
    length = 76.0 * size  # base -> endocardial apex
    centre = 6.0 * rng.standard_normal(2)  # LV axis position in the base plane
    tilt = 0.12 * rng.standard_normal(2)  # drift of the LV axis per mm along the long axis
    base_z = min(-40.0 + 1.5 * rng.standard_normal(), -37.0)  # base plane, mm (default slice 0: -36)
    theta = np.deg2rad(200.0 + 12.0 * rng.standard_normal())  # direction of the RV from the LV
    contraction = rng.uniform(0.25, 0.35)  # cavity radius shortening at end-systole
    t_es = 0.35 + 0.02 * rng.standard_normal()
    rv_thick = 20.0 * (1.0 + 0.15 * rng.standard_normal())  # max RV cavity width (base, ED)
    rv_contraction = 0.8 * contraction + 0.1 * rng.uniform()
    ellipticity = 0.04 * rng.standard_normal(2)  # cos/sin 2-theta boundary harmonics
    papillary_angles = np.deg2rad([-40.0, 60.0]) + 0.2 * rng.standard_normal(2)
    texture_lat = _random_grid(rng, 3, 120.0, 6.0, 2)  # tissue texture, fat
    bias_lat = _random_grid(rng, 2, 120.0, 50.0, 1)[0]
    lung_lat = _random_grid(rng, 2, 120.0, 20.0, 1)[0]
    means = {
        "blood": 0.8 * (1 + 0.03 * rng.standard_normal()),
        "myo": 0.3 * (1 + 0.05 * rng.standard_normal()),
        "tissue": 0.45 * (1 + 0.05 * rng.standard_normal()),
    }

    # ---- geometry -----------------------------------------------------------------------------
    x, y, z = _voxel_centres_mm(shape, (sx, sy, sz))  # (X,1,1), (1,Y,1), (1,1,Z)
    zeta = (z - base_z)[..., None]  # depth below the base plane, (1, 1, Z, 1)
    phase = np.arange(frames, dtype=np.float64) / frames  # (T,)
    systole = 0.5 * (1.0 - np.cos(np.pi * np.clip(phase / t_es, 0.0, 1.0)))
    diastole = 0.5 * (1.0 + np.cos(np.pi * np.clip((phase - t_es) / (1.0 - t_es), 0.0, 1.0) ** 0.6))
    c_t = np.where(phase <= t_es, systole, diastole)  # 0 at ED, 1 at ES, (T,)

    # LV: truncated ellipsoid along z; long-axis shortening of 10 % moves the apex up
    length_t = length * (1.0 - 0.1 * c_t)  # (T,)
    shape_ed = np.sqrt(np.clip(1.0 - (zeta / length) ** 2, 0.0, None)) * (zeta >= 0)
    endo_ed = r_endo_ed * shape_ed  # (1,1,Z,1)
    epi_shape = np.sqrt(np.clip(1.0 - (zeta / (length + 0.9 * wall)) ** 2, 0, None)) * (zeta >= 0)
    epi_ed = (r_endo_ed + wall) * epi_shape
    endo = r_endo_ed * np.sqrt(np.clip(1.0 - (zeta / length_t) ** 2, 0.0, None)) * (zeta >= 0)
    endo = endo * (1.0 - contraction * c_t)  # (1,1,Z,T)
    endo = np.minimum(endo, endo_ed)
    epi = np.sqrt(endo**2 + epi_ed**2 - endo_ed**2)  # conserve myocardial area per slice

    cx = centre[0] + tilt[0] * (z - base_z)  # LV axis per slice, (1,1,Z)
    cy = centre[1] + tilt[1] * (z - base_z)
    dx, dy = x - cx, y - cy  # (X,1,Z), (1,Y,Z)
    r = np.sqrt(dx**2 + dy**2)  # (X,Y,Z)
    ang = np.arctan2(dy, dx)
    shape_fac = 1.0 + ellipticity[0] * np.cos(2 * ang) + ellipticity[1] * np.sin(2 * ang)
    rn = (r / shape_fac)[..., None]  # (X,Y,Z,1)
    lv_pool = rn < endo
    lv_myo = (rn >= endo) & (rn < epi)

    # RV: an ellipse pushed out towards theta that wraps the septal side of the LV; its pool is
    # the part outside the LV epicardium. Thickness h (mm) tapers to 0 at ~80 % of the length.
    rv_taper = np.sqrt(np.clip(1.0 - (zeta / (0.8 * length)) ** 2, 0.0, None)) * (zeta >= 0)
    h = rv_thick * rv_taper * (1.0 - rv_contraction * c_t)  # (1,1,Z,T)
    rv_a = 0.75 * (epi + h)
    rv_s = epi + h - rv_a  # centre offset: far free wall at epi + h from the LV axis
    rv_b = 0.9 * epi + 1.0 * h
    u = (np.cos(theta) * dx + np.sin(theta) * dy)[..., None]
    v = (-np.sin(theta) * dx + np.cos(theta) * dy)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        rv_rho = np.sqrt(((u - rv_s) / rv_a) ** 2 + (v / rv_b) ** 2)
    rv_rho = np.where(h > 0.5, rv_rho, np.inf)  # (X,Y,Z,T)
    outside_lv = rn >= epi
    rv_pool = (rv_rho < 1.0) & outside_lv
    rv_wall = (rv_rho >= 1.0) & (rv_rho < 1.0 + 3.5 / np.maximum(rv_b, 1.0)) & outside_lv
    re0 = r_endo_ed + wall

    labels = np.zeros(shape + (frames,), np.uint8)
    labels[lv_myo] = CARDIAC_LABELS["lv-myocardium"]
    labels[lv_pool] = CARDIAC_LABELS["lv-blood-pool"]
    labels[rv_pool] = CARDIAC_LABELS["rv-blood-pool"]

    # ---- image ----------------------------------------------------------------------------------
    pts = np.broadcast_arrays(x, y, z)
    tex = _sample(ndi.gaussian_filter(texture_lat[0], 1.0), 120.0, pts, order=1)
    fat_field = _normalised(_sample(ndi.gaussian_filter(texture_lat[1], 1.5), 120.0, pts, order=1))
    tissue = means["tissue"] * (1.0 + 0.25 * tex / max(float(np.abs(tex).max()), 1e-9))
    img = np.broadcast_to(tissue[..., None], labels.shape).astype(np.float32)

    # lungs: lateral to the LV and beyond the RV, boundaries perturbed by a smooth field
    lung_pert = 9.0 * _normalised(_sample(lung_lat, 120.0, [x, y], order=3))  # (X,Y,1) mm
    lung = np.zeros(shape, bool)
    for ang_off, dist, rad in ((np.pi, 75.0, 45.0), (-0.4, 85.0, 40.0)):
        lx = centre[0] + dist * np.cos(theta + ang_off)
        ly = centre[1] + dist * np.sin(theta + ang_off)
        lung |= np.sqrt((x - lx) ** 2 + (y - ly) ** 2) + lung_pert < rad
    lung &= (rn[..., 0] > epi_ed[..., 0] + 8.0) & (rv_rho[..., 0] > 1.3)  # around the ED heart
    img = np.where(lung[..., None], np.float32(0.06), img)
    # descending aorta, posterior to the heart
    ao = centre + (re0 + 22.0) * np.array([np.cos(theta + 2.3), np.sin(theta + 2.3)])
    aorta = np.sqrt((x - ao[0]) ** 2 + (y - ao[1]) ** 2) < 11.0
    img = np.where(aorta[..., None], np.float32(0.75), img)
    # epicardial fat: bright patches in a 4 mm band around the heart
    band = (rn >= epi) & (rn < epi + 4.0) & ~rv_pool & ~rv_wall & (epi > 0)
    img = np.where(band & (fat_field[..., None] > 0.45), np.float32(0.7), img)
    img = np.where(rv_wall, np.float32(means["myo"]), img)
    img = np.where(lv_myo, np.float32(means["myo"]), img)
    img = np.where(lv_pool | rv_pool, np.float32(means["blood"]), img)
    # papillary muscles (inside the labelled LV pool), mid-ventricular slices only
    for a in papillary_angles:
        pr = 0.7 * endo
        px = np.cos(a + theta) * pr
        py = np.sin(a + theta) * pr
        pap = (dx[..., None] - px) ** 2 + (dy[..., None] - py) ** 2 < (0.13 * endo) ** 2
        pap &= lv_pool & (zeta > 15.0) & (zeta < 0.75 * length)
        img = np.where(pap, np.float32(means["myo"] + 0.03), img)

    img = ndi.gaussian_filter(img, (0.6, 0.6, 0.0, 0.0))  # in-plane point-spread function
    bias = 1.0 + 0.1 * _normalised(_sample(bias_lat, 120.0, [x, y], order=3))  # coil sensitivity
    img *= bias[..., None].astype(np.float32)  # (X,Y,1,1)
    sigma = np.float32(0.02)
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n2 = rng.standard_normal(img.shape, dtype=np.float32)
    img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)  # Rician magnitude noise
    return np.clip(img, 0.0, 1.0).astype(np.float32), labels


# --------------------------------------------------------------------------------------------
# Writing phantom datasets (nnU-Net raw or UK Biobank layout)
# --------------------------------------------------------------------------------------------

#: default grid shape per phantom kind (brain2d/3d: the benchmark data's shapes)
PHANTOM_SHAPES: dict[str, tuple[int, ...]] = {
    "brain2d": (160, 192),
    "brain3d": (80, 96, 112),
    "cardiac": (96, 96, 10),
}
_CARDIAC_SPACING = (1.8, 1.8, 8.0)  # mm at the default cardiac shape


def brain_spacing(shape: Sequence[int]) -> tuple[float, ...]:
    """Isotropic spacing (mm) at which the brain phantom's field of view fills ``shape``."""
    iso = max(f / n for f, n in zip(_BRAIN_FOV[: len(shape)], shape))
    return (iso,) * len(shape)


def phantom_spacing(kind: str, shape: Sequence[int]) -> tuple[float, ...]:
    """Voxel spacing (mm) used for ``kind`` at grid ``shape``: the field of view stays the same
    at any size (a 2x larger grid samples the same anatomy twice as finely). Cardiac grids of
    the default shape (96, 96, 10) get 1.8 x 1.8 x 8 mm voxels."""
    if kind == "cardiac":
        return tuple(s * d / n for s, d, n in zip(_CARDIAC_SPACING, PHANTOM_SHAPES["cardiac"], shape))
    return brain_spacing(shape)


def subject_seed(seed: int, index: int) -> int:
    """Seed of subject ``index`` of a dataset made with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_phantom_dataset(kind: str, out: str | Path, n_train: int, n_test: int = 0, seed: int = 0,
                          layout: str = "nnunet", shape: Sequence[int] | None = None,
                          frames: int = 12) -> Path:
    """Write ``n_train`` training and ``n_test`` test phantom subjects to ``out``.

    Layouts:
        ``"nnunet"``: ``dataset.json``, ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz``
            (+ ``imagesTs`` / ``labelsTs``). Brain cases are ``phantomNNN`` (one case per
            subject); cardiac cases are one 3D volume per frame, ``heartNNN_tTT``, so the subject
            rule (case id up to the first underscore) groups a subject's frames.
        ``"ukbb"`` (cardiac only): ``train/heartNNN/{sa,seg_sa}.nii.gz`` 4D (X, Y, Z, T), and
            ``test/...`` when ``n_test > 0``; without test subjects the subject folders sit
            directly in ``out``.

    The dataset is assembled in a temporary sibling directory and renamed onto ``out`` at the
    end, so an interrupted run leaves nothing half-written. An existing ``out`` is replaced.
    """
    if kind not in PHANTOM_SHAPES:
        raise ValueError(f"unknown phantom kind {kind!r} ({', '.join(PHANTOM_SHAPES)})")
    if layout == "ukbb" and kind != "cardiac":
        raise ValueError("the UK Biobank layout holds cardiac cine data only")
    default_shape = PHANTOM_SHAPES[kind]
    shape = tuple(shape) if shape is not None else default_shape
    if len(shape) != len(default_shape):
        raise ValueError(f"{kind} needs a {len(default_shape)}-axis shape, got {shape}")
    spacing = phantom_spacing(kind, shape)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    make_dir_public(tmp)
    affine = np.diag([*spacing, *([1.0] * (3 - len(spacing))), 1.0])
    try:
        names = CARDIAC_LABELS if kind == "cardiac" else BRAIN_LABELS
        for index in progress(range(n_train + n_test), desc=f"writing {kind} phantoms"):
            split = "Tr" if index < n_train else "Ts"
            s = subject_seed(seed, index)
            if kind == "cardiac":
                image, labels = cardiac_phantom(shape, frames, s, spacing)
                case = f"heart{index:03d}"
                if layout == "ukbb":
                    folder = tmp / (("train" if split == "Tr" else "test") if n_test else "") / case
                    like = Volume(labels, affine, 4, time_step=1.0 / frames)
                    save_image(image, folder / "sa.nii.gz", like=like)
                    save_labels(labels, folder / "seg_sa.nii.gz", like=like)
                    continue
                for t in range(frames):
                    like = Volume(labels[..., t], affine, 3)
                    save_image(image[..., t], tmp / f"images{split}" / f"{case}_t{t:02d}_0000.nii.gz", like=like)
                    save_labels(labels[..., t], tmp / f"labels{split}" / f"{case}_t{t:02d}.nii.gz", like=like)
            else:
                image, labels = brain_phantom(shape, s, spacing)
                case = f"phantom{index:03d}"
                like = Volume(labels, affine, len(shape))
                save_image(image, tmp / f"images{split}" / f"{case}_0000.nii.gz", like=like)
                save_labels(labels, tmp / f"labels{split}" / f"{case}.nii.gz", like=like)
        if layout == "nnunet":
            meta = {"name": f"phantom-{kind}", "channel_names": {"0": "cine" if kind == "cardiac" else "T1"},
                    "labels": dict(names), "file_ending": ".nii.gz",
                    "numTraining": n_train * (frames if kind == "cardiac" else 1),
                    "description": f"inrseg synthetic {kind} phantom, seed {seed}, shape {list(shape)}, "
                                   f"spacing {list(spacing)} mm"}
            (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
