"""The cardiac phantom: a 3D+t short-axis cine (bSSFP-like) of a beating left and right ventricle.

Axes: (x, y) = short-axis plane, axis 2 = slice index from the **base** (index 0) to the
**apex** (index Z-1), axis 3 = cardiac phase, frame 0 = end-diastole. Geometry is in mm relative
to the grid centre (:mod:`inrseg.data.phantoms`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from inrseg.data.phantoms.fields import normalised, random_grid, sample_lattice, voxel_centres_mm

__all__ = ["CARDIAC_LABELS", "cardiac_phantom"]

CARDIAC_LABELS: dict[str, int] = {
    "background": 0,
    "lv-blood-pool": 1,
    "lv-myocardium": 2,
    "rv-blood-pool": 3,
}


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
    texture_lat = random_grid(rng, 3, 120.0, 6.0, 2)  # tissue texture, fat
    bias_lat = random_grid(rng, 2, 120.0, 50.0, 1)[0]
    lung_lat = random_grid(rng, 2, 120.0, 20.0, 1)[0]
    means = {
        "blood": 0.8 * (1 + 0.03 * rng.standard_normal()),
        "myo": 0.3 * (1 + 0.05 * rng.standard_normal()),
        "tissue": 0.45 * (1 + 0.05 * rng.standard_normal()),
    }

    # ---- geometry -----------------------------------------------------------------------------
    x, y, z = voxel_centres_mm(shape, (sx, sy, sz))  # (X,1,1), (1,Y,1), (1,1,Z)
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
    tex = sample_lattice(ndi.gaussian_filter(texture_lat[0], 1.0), 120.0, pts, order=1)
    fat_field = normalised(sample_lattice(ndi.gaussian_filter(texture_lat[1], 1.5), 120.0, pts, order=1))
    tissue = means["tissue"] * (1.0 + 0.25 * tex / max(float(np.abs(tex).max()), 1e-9))
    img = np.broadcast_to(tissue[..., None], labels.shape).astype(np.float32)

    # lungs: lateral to the LV and beyond the RV, boundaries perturbed by a smooth field
    lung_pert = 9.0 * normalised(sample_lattice(lung_lat, 120.0, [x, y], order=3))  # (X,Y,1) mm
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
    bias = 1.0 + 0.1 * normalised(sample_lattice(bias_lat, 120.0, [x, y], order=3))  # coil sensitivity
    img *= bias[..., None].astype(np.float32)  # (X,Y,1,1)
    sigma = np.float32(0.02)
    n1 = rng.standard_normal(img.shape, dtype=np.float32)
    n2 = rng.standard_normal(img.shape, dtype=np.float32)
    img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)  # Rician magnitude noise
    return np.clip(img, 0.0, 1.0).astype(np.float32), labels
