"""Subject-wise splits: the subject of a case, the validation split, a splits JSON.

Splits are always by **subject**, never by case, so slices of one subject never straddle
train and validation. The subject id of a case is, by default, **the case id up to its first
underscore** (``sub01_cor+00`` -> ``sub01``, ``pat0003_z060`` -> ``pat0003``,
``sub01`` -> ``sub01``). A splits JSON overrides both the rule and the split::

    {"subjects": {"case_id": "subject_id", ...},      # optional: case -> subject map
     "train": ["sub01", ...], "val": ["sub02", ...],  # optional: explicit subject lists
     "test": [...]}
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Sequence

from inrseg.core.errors import InputError
from inrseg.core.files import read_json
from inrseg.data.cases import Case, Dataset

__all__ = ["apply_test_split", "split_by_subject", "subject_map", "subject_of"]


def subject_of(case_id: str) -> str:
    """Default subject id of a case: the case id up to its first underscore."""
    return case_id.split("_", 1)[0]


def subject_map(splits_file: str | Path | None) -> dict[str, str]:
    """The ``{case id: subject id}`` map of a splits JSON's ``"subjects"`` (``{}`` without one)."""
    if splits_file is None:
        return {}
    return {str(k): str(v) for k, v in read_json(Path(splits_file)).get("subjects", {}).items()}


def apply_test_split(ds: Dataset, splits_file: str | Path | None) -> Dataset:
    """Move the subjects a splits JSON lists under ``"test"`` into ``ds.test`` (in place)."""
    if splits_file is None:
        return ds
    spec = read_json(Path(splits_file))
    test_subjects = set(map(str, spec.get("test", [])))
    if test_subjects:
        everything = ds.train + ds.test
        ds.train = [c for c in everything if c.subject_id not in test_subjects]
        ds.test = [c for c in everything if c.subject_id in test_subjects]
    return ds


def split_by_subject(cases: Sequence[Case], val_fraction: float = 0.2, seed: int = 0,
                     splits_file: str | Path | None = None) -> tuple[list[Case], list[Case]]:
    """Carve a validation split out of training cases, by subject.

    With a splits JSON that lists ``"val"`` (and optionally ``"train"``) subjects, those are
    used. Otherwise ``ceil(val_fraction * n_subjects)`` subjects (at least 1 when there are 2 or
    more subjects and ``val_fraction > 0``) are drawn with a seeded shuffle of the sorted subject
    ids, so the split is deterministic.

    Returns:
        ``(train_cases, val_cases)``; no subject appears in both.
    """
    subjects = sorted({c.subject_id for c in cases})
    if splits_file is not None:
        spec = read_json(Path(splits_file))
        if "val" in spec:
            val_s = set(map(str, spec["val"]))
            train_s = set(map(str, spec.get("train", []))) or (set(subjects) - val_s)
            unknown = (val_s | train_s) - set(subjects)
            if unknown:
                raise InputError(Path(splits_file), f"subjects {sorted(unknown)[:5]} are not in the dataset")
            return ([c for c in cases if c.subject_id in train_s],
                    [c for c in cases if c.subject_id in val_s])
    n_val = 0
    if val_fraction > 0 and len(subjects) >= 2:
        n_val = min(len(subjects) - 1, max(1, math.ceil(val_fraction * len(subjects))))
    order = list(subjects)
    random.Random(seed).shuffle(order)
    val_s = set(order[:n_val])
    return ([c for c in cases if c.subject_id not in val_s], [c for c in cases if c.subject_id in val_s])
