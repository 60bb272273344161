"""Subject-wise splits: the subject of a case, the validation split, a splits JSON.

Splits are always by **subject**, never by case, so slices or frames of one subject never
straddle train and validation. The default subject of a case (:func:`subject_rule`) is its case id
up to the first underscore (``sub01_cor+00`` -> ``sub01``, ``patient001_frame01`` -> ``patient001``)
where that prefix tells the cases apart; where every case shares it and a case number follows
(MSD's ``hippocampus_001``, ``hippocampus_003``...) the next underscore is tried, and so on, down
to each case being its own subject, so numbered cases are never collapsed into one subject. A splits
JSON overrides both the rule and the split::

    {"subjects": {"case_id": "subject_id", ...},      # optional: case -> subject map
     "train": ["sub01", ...], "val": ["sub02", ...],  # optional: explicit subject lists
     "test": [...]}
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Sequence

from inrseg.core.errors import InputError
from inrseg.data.cases import Case, Dataset
from inrseg.data.schemas import read_splits

__all__ = ["apply_test_split", "assign_subjects", "fold_splits", "split_by_subject", "subject_map", "subject_of", "subject_rule"]


def subject_of(case_id: str, depth: int | None = 1) -> str:
    """The case id up to its ``depth``-th underscore (the whole id where it has fewer, or for
    ``depth`` ``None``)."""
    if depth is None:
        return case_id
    return "_".join(case_id.split("_")[:depth])


_ORDINAL = {1: "first", 2: "second", 3: "third"}


def subject_rule(case_ids: Sequence[str]) -> tuple[int | None, str]:
    """The default subject rule for these case ids: ``(depth, description)``.

    ``depth``: the smallest ``k`` such that the ids up to their ``k``-th underscore name at least
    two subjects (``None``: each case its own subject, where no prefix does, or for one case).
    A prefix every case shares followed by a running number is a task name, not a subject: MSD's
    ``hippocampus_001`` is its own subject, while ``heart000_t00`` and ``heart000_t01`` share one.
    ``description`` says it in words, for the line commands print before they split.
    """
    ids = sorted(set(case_ids))
    if len(ids) < 2:
        return None, "each case its own subject"
    for depth in range(1, max(cid.count("_") for cid in ids) + 1):
        how = f"case id up to the {_ORDINAL.get(depth, f'{depth}th')} underscore"
        if len({subject_of(cid, depth) for cid in ids}) >= 2:
            return depth, how
        # one shared prefix: a running case number after it (MSD's hippocampus_001) names cases;
        # a next level that groups cases (study_A_t1, study_A_t2, study_B_t1) names subjects;
        # anything else (heart000_t00, heart000_t01) names parts of the one subject
        following = [cid.split("_")[depth] if cid.count("_") >= depth else "" for cid in ids]
        deeper = len({subject_of(cid, depth + 1) for cid in ids})
        shared = len(set(following)) == 1       # still part of the shared prefix (BraTS_2021_...)
        if not (shared or all(t.isdigit() for t in following) or 2 <= deeper < len(ids)):
            return depth, how + " (every case names the same subject)"
    return None, "each case its own subject (the names are a shared prefix and a case number)"


def assign_subjects(cases: Sequence[Case], explicit: dict[str, str] | None = None) -> tuple[list[Case], str]:
    """``cases`` with their subject ids set by the default :func:`subject_rule` of their case
    ids, or by ``explicit`` (a splits JSON's ``"subjects"`` map) for the cases it names; and the
    line that says so, e.g. ``"60 subjects: case id up to the first underscore"``."""
    explicit = explicit or {}
    depth, how = subject_rule([c.case_id for c in cases if c.case_id not in explicit])
    out = [dataclasses.replace(c, subject_id=explicit.get(c.case_id, subject_of(c.case_id, depth)))
           for c in cases]
    named = sum(c.case_id in explicit for c in cases)
    if named == len(cases) and cases:
        how = "from the splits file's \"subjects\""
    elif named:
        how += f" ({named} cases from the splits file's \"subjects\")"
    return out, f"{len({c.subject_id for c in out})} subjects: {how}"


def subject_map(splits_file: str | Path | None) -> dict[str, str]:
    """The ``{case id: subject id}`` map of a splits JSON's ``"subjects"`` (``{}`` without one)."""
    if splits_file is None:
        return {}
    return dict(read_splits(splits_file).get("subjects", {}))


def apply_test_split(ds: Dataset, splits_file: str | Path | None) -> Dataset:
    """Move the subjects a splits JSON lists under ``"test"`` into ``ds.test`` (in place); a
    subject it names that the dataset lacks, or a split that leaves nothing to train on, is an
    :class:`InputError` naming the file."""
    if splits_file is None:
        return ds
    spec = read_splits(splits_file)
    test_subjects = set(spec.get("test", []))
    if test_subjects:
        everything = ds.train + ds.test
        unknown = sorted(test_subjects - {c.subject_id for c in everything})
        if unknown:
            raise InputError(Path(splits_file), f"'test' names subjects {unknown[:5]} that are not in the dataset")
        ds.train = [c for c in everything if c.subject_id not in test_subjects]
        ds.test = [c for c in everything if c.subject_id in test_subjects]
        if not ds.train:
            raise InputError(Path(splits_file), "every subject is in 'test': none is left to train on")
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
        spec = read_splits(splits_file)
        if "val" in spec:
            val_s = set(spec["val"])
            train_s = set(spec.get("train", [])) or (set(subjects) - val_s)
            unknown = (val_s | train_s) - set(subjects)
            if unknown:
                raise InputError(Path(splits_file), f"subjects {sorted(unknown)[:5]} are not in the dataset")
            if not train_s:
                raise InputError(Path(splits_file), "every subject is in 'val': none is left to train on")
            return ([c for c in cases if c.subject_id in train_s],
                    [c for c in cases if c.subject_id in val_s])
    n_val = 0
    if val_fraction > 0 and len(subjects) >= 2:
        n_val = min(len(subjects) - 1, max(1, math.ceil(val_fraction * len(subjects))))
    order = list(subjects)
    random.Random(seed).shuffle(order)
    val_s = set(order[:n_val])
    return ([c for c in cases if c.subject_id not in val_s], [c for c in cases if c.subject_id in val_s])


def fold_splits(cases: Sequence[Case], folds: int, seed: int = 0) -> list[tuple[list[Case], list[Case]]]:
    """``folds``-fold cross-validation by subject: ``[(train_cases, held_out_cases)]`` per fold.

    The sorted subject ids are shuffled with ``seed`` and dealt round-robin into ``folds``
    groups; fold ``f`` holds out group ``f``. Every subject is held out exactly once; no subject
    is ever on both sides of one fold.

    Raises:
        InputError: fewer subjects than folds, or ``folds < 2``.
    """
    subjects = sorted({c.subject_id for c in cases})
    if folds < 2:
        raise InputError(None, f"--folds {folds}: cross-validation needs at least 2 folds")
    if len(subjects) < folds:
        raise InputError(None, f"--folds {folds}: only {len(subjects)} training subjects")
    order = list(subjects)
    random.Random(seed).shuffle(order)
    group = {s: i % folds for i, s in enumerate(order)}
    return [([c for c in cases if group[c.subject_id] != f], [c for c in cases if group[c.subject_id] == f])
            for f in range(folds)]
