"""Tests of the synthetic brain / cardiac phantoms (inrseg.data.phantoms)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull

from inrseg.data.phantoms.brain import BRAIN_LABELS, brain_phantom
from inrseg.data.phantoms.cardiac import CARDIAC_LABELS, cardiac_phantom

B = BRAIN_LABELS
C = CARDIAC_LABELS
SHAPE_2D = (160, 192)
SHAPE_3D = (48, 56, 64)
SPACING_2D = 150.0 / 160  # what spacing=None picks for SHAPE_2D (field of view 150 x 184 mm)


@pytest.fixture(scope="module")
def brain2d() -> tuple[np.ndarray, np.ndarray]:
    return brain_phantom(SHAPE_2D, seed=0)


@pytest.fixture(scope="module")
def brain3d() -> tuple[np.ndarray, np.ndarray]:
    return brain_phantom(SHAPE_3D, seed=0)


@pytest.fixture(scope="module")
def cardiac() -> tuple[np.ndarray, np.ndarray]:
    return cardiac_phantom(seed=0)


def _fractions(labels: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(labels.ravel(), minlength=n) / labels.size


# ------------------------------------------------------------------------------------------ brain


@pytest.mark.parametrize("shape", [SHAPE_2D, SHAPE_3D])
def test_brain_shapes_dtypes_and_determinism(shape: tuple[int, ...]) -> None:
    image, labels = brain_phantom(shape, seed=3)
    assert image.shape == labels.shape == shape
    assert image.dtype == np.float32 and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= set(B.values())
    image2, labels2 = brain_phantom(shape, seed=3)
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(labels, labels2)
    image3, labels3 = brain_phantom(shape, seed=4)
    assert (labels3 != labels).mean() > 0.02
    assert not np.allclose(image, image3)


@pytest.mark.parametrize("which", ["brain2d", "brain3d"])
def test_brain_classes_and_fractions(which: str, request: pytest.FixtureRequest) -> None:
    image, labels = request.getfixturevalue(which)
    frac = _fractions(labels, 5)
    assert np.all(frac > 0), frac
    tissue = {k: frac[v] for k, v in B.items() if v}
    assert max(tissue, key=tissue.get) == "white-matter"
    assert tissue["cortex"] > 0.2 * tissue["white-matter"]  # a non-trivial ribbon
    assert tissue["subcortical-grey-matter"] > 0.01 * frac[1:].sum()
    assert 0.1 < frac[0] < 0.9  # background around the head


@pytest.mark.parametrize("which", ["brain2d", "brain3d"])
def test_brain_intensities(which: str, request: pytest.FixtureRequest) -> None:
    image, labels = request.getfixturevalue(which)
    means = {k: float(image[labels == v].mean()) for k, v in B.items()}
    assert means["white-matter"] > means["subcortical-grey-matter"] > means["cortex"] > means["csf"]
    assert means["background"] < 0.01
    assert 0.0 <= image.min() and image.max() < 0.7
    # skull-stripped: exactly zero a couple of voxels away from the head
    far = ~ndi.binary_dilation(labels > 0, iterations=2)
    assert np.all(image[far] == 0.0)
    # noise is present inside the brain
    wm = ndi.binary_erosion(labels == B["white-matter"], iterations=2)
    assert 0.003 < image[wm].std() < 0.05


def test_brain_cortex_is_folded(brain2d: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = brain2d
    # white matter + deep nuclei, with the ventricles filled: an unfolded (ellipsoidal) surface
    # fills ~96 % of its convex hull; gyri and sulci bring this well below 90 %.
    inner = ndi.binary_fill_holes(np.isin(labels, (B["white-matter"], B["subcortical-grey-matter"])))
    hull = ConvexHull(np.argwhere(inner).astype(float))
    assert inner.sum() / hull.volume < 0.9
    # many sulci: the cortex/CSF ribbon is cut into a long, winding band, i.e. its area is far
    # larger than the envelope perimeter x thickness (2.6 mm) of a smooth ribbon
    head = labels > 0
    perimeter_mm = (head & ~ndi.binary_erosion(head)).sum() * SPACING_2D
    cortex_mm2 = (labels == B["cortex"]).sum() * SPACING_2D**2
    assert cortex_mm2 > 1.8 * perimeter_mm * 2.6


@pytest.mark.parametrize("which", ["brain2d", "brain3d"])
def test_brain_topology(which: str, request: pytest.FixtureRequest) -> None:
    _, labels = request.getfixturevalue(which)
    spacing = SPACING_2D if which == "brain2d" else max(150 / 48, 184 / 56, 136 / 64)
    # cortex lies between white matter and the outside: close to white matter ...
    dist_wm = ndi.distance_transform_edt(labels != B["white-matter"], sampling=spacing)
    assert np.mean(dist_wm[labels == B["cortex"]] <= 4.0 + spacing) > 0.95
    # ... and white matter never touches the background directly
    wm_dilated = ndi.binary_dilation(labels == B["white-matter"])
    assert np.mean(labels[wm_dilated] == B["background"]) < 0.005
    # ventricles: CSF enclosed by white matter / deep grey matter, near the centre of the brain
    # (enclosed CSF far from the centre is a sulcus cut through by a 2D slice / coarse grid)
    inner = ndi.binary_fill_holes(np.isin(labels, (B["white-matter"], B["subcortical-grey-matter"])))
    centre = np.argwhere(labels > 0).mean(0)
    grid = np.indices(labels.shape).reshape(labels.ndim, -1).T.reshape(labels.shape + (labels.ndim,))
    central = np.linalg.norm((grid - centre) * spacing, axis=-1) < 35.0
    ventricles = inner & central & (labels == B["csf"])
    assert ventricles.sum() * spacing**labels.ndim > (60.0 if labels.ndim == 2 else 1500.0)
    vent_centre = np.argwhere(ventricles).mean(0)
    assert np.linalg.norm((vent_centre - centre) * spacing) < 20.0
    around = ndi.binary_dilation(ventricles) & ~ventricles
    assert np.isin(labels[around], (B["white-matter"], B["subcortical-grey-matter"], B["csf"])).mean() > 0.97


def test_brain_left_right_roughly_symmetric(brain2d: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = brain2d
    head = labels > 0
    assert (head & head[::-1]).sum() / head.sum() > 0.85
    deep = labels == B["subcortical-grey-matter"]
    left, right = deep[: SHAPE_2D[0] // 2].sum(), deep[SHAPE_2D[0] // 2 :].sum()
    assert 0.6 < left / right < 1.6


def test_brain_resolution_independent() -> None:
    _, coarse = brain_phantom(SHAPE_2D, seed=1)
    _, fine = brain_phantom((2 * SHAPE_2D[0], 2 * SHAPE_2D[1]), seed=1)
    np.testing.assert_allclose(_fractions(coarse, 5), _fractions(fine, 5), atol=0.01)
    # same anatomy, sampled finer: the fine map downsampled agrees with the coarse one
    assert (fine[::2, ::2] == coarse).mean() > 0.85 or (fine[1::2, 1::2] == coarse).mean() > 0.85


def test_brain_anisotropic_spacing_keeps_physical_shape() -> None:
    _, iso = brain_phantom((80, 96), seed=2, spacing=(2.0, 2.0))
    _, aniso = brain_phantom((80, 48), seed=2, spacing=(2.0, 4.0))
    head_iso = (iso > 0).sum() * 4.0
    head_aniso = (aniso > 0).sum() * 8.0
    assert abs(head_aniso / head_iso - 1.0) < 0.03


# ---------------------------------------------------------------------------------------- cardiac


def test_cardiac_shapes_dtypes_and_determinism(cardiac: tuple[np.ndarray, np.ndarray]) -> None:
    image, labels = cardiac
    assert image.shape == labels.shape == (96, 96, 10, 12)
    assert image.dtype == np.float32 and labels.dtype == np.uint8
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert set(np.unique(labels)) == set(C.values())
    image2, labels2 = cardiac_phantom(seed=0)
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(labels, labels2)
    image3, labels3 = cardiac_phantom(seed=1)
    assert (labels3 != labels).mean() > 0.005
    assert not np.allclose(image, image3)
    small_img, small_lab = cardiac_phantom((32, 40, 6), frames=5, seed=7)
    assert small_img.shape == small_lab.shape == (32, 40, 6, 5)


def test_cardiac_anatomy(cardiac: tuple[np.ndarray, np.ndarray]) -> None:
    image, labels = cardiac
    n_slices, n_frames = labels.shape[2:]
    for z in (n_slices // 2 - 1, n_slices // 2):
        assert set(np.unique(labels[:, :, z, 0])) == set(C.values())
    # RV stops before the apex; the basal slices are the largest
    assert not np.any(labels[:, :, -1] == C["rv-blood-pool"])
    area = [(labels[:, :, z, 0] > 0).sum() for z in range(n_slices)]
    assert area[0] == max(area) and area[-1] < 0.3 * area[0]
    # myocardium surrounds the LV pool (in-plane 4-neighbourhood of the pool)
    pool = labels == C["lv-blood-pool"]
    cross = ndi.generate_binary_structure(2, 1)[:, :, None, None]
    ring = ndi.binary_dilation(pool, structure=cross) & ~pool
    assert np.mean(labels[ring] == C["lv-myocardium"]) > 0.95
    # image contrast: bright blood, dark myocardium
    blood = image[labels == C["lv-blood-pool"]].mean()
    myo = image[labels == C["lv-myocardium"]].mean()
    assert blood > 0.65 and myo < 0.45 and blood > myo + 0.3


def test_cardiac_motion(cardiac: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = cardiac
    n_frames = labels.shape[3]
    lv = [(labels[..., t] == C["lv-blood-pool"]).sum() for t in range(n_frames)]
    es = round(0.35 * n_frames)
    assert lv[es] < 0.8 * lv[0]
    assert lv[-1] > 0.9 * lv[0]  # relaxes back by the end of the cycle
    assert int(np.argmin(lv)) in range(es - 1, es + 2)
    # the myocardium thickens but keeps (approximately) its volume
    myo = [(labels[..., t] == C["lv-myocardium"]).sum() for t in range(n_frames)]
    assert abs(myo[es] / myo[0] - 1.0) < 0.15
    rv = [(labels[..., t] == C["rv-blood-pool"]).sum() for t in range(n_frames)]
    assert rv[es] < 0.85 * rv[0]


def test_cardiac_resolution_independent(cardiac: tuple[np.ndarray, np.ndarray]) -> None:
    _, fine = cardiac
    _, coarse = cardiac_phantom((48, 48, 10), seed=0, spacing=(3.6, 3.6, 8.0))
    np.testing.assert_allclose(_fractions(coarse, 4), _fractions(fine, 4), atol=0.005)
