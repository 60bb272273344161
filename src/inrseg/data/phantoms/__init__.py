"""Deterministic synthetic phantoms: a folded brain (2D/3D) and a 3D+t cardiac short-axis cine.

Modules: :mod:`~inrseg.data.phantoms.brain` (:func:`brain_phantom`),
:mod:`~inrseg.data.phantoms.cardiac` (:func:`cardiac_phantom`),
:mod:`~inrseg.data.phantoms.datasets` (:func:`write_phantom_dataset`: nnU-Net or UK Biobank
folders of phantom subjects), :mod:`~inrseg.data.phantoms.fields` (the random fields and
geometry both phantoms draw on).

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
* Axes: see :mod:`~inrseg.data.phantoms.brain` and :mod:`~inrseg.data.phantoms.cardiac`.
* Everything is drawn from ``np.random.default_rng(seed)`` in a fixed order that does not depend
  on the grid, so the same seed gives bit-identical arrays and the same anatomy at any resolution.
"""
