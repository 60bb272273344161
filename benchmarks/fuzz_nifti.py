"""Coverage-guided fuzzing of the NIfTI reader (issue 13): random bytes and mutated headers.

    pip install atheris
    python benchmarks/fuzz_nifti.py --minutes 30 --out benchmarks/results

Every input is written as a ``.nii`` or a ``.nii.gz`` (by its first byte) and read with
``load_image`` and ``load_labels``. The only acceptable failure is
:class:`~inrseg.errors.InputError` (a one-line message naming the file); anything else (an
uncaught exception, a MemoryError, a hang) is a finding: the input is saved and the run stops.
The seed corpus is a handful of valid files (2D, 3D, 4D; float, integer, scaled; NIfTI-1 and
NIfTI-2). Memory is capped with ``INRSEG_MAX_MEMORY_GB=1`` so that a header claiming a huge
image must be refused by the size checks, not by the machine.

Writes ``<date>-fuzz-nifti.md`` with the number of inputs tried, the coverage reached and the
findings.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("INRSEG_MAX_MEMORY_GB", "1")
logging.getLogger("nibabel").setLevel(logging.CRITICAL)  # its warnings about odd headers: noise here

import atheris  # noqa: E402
import numpy as np  # noqa: E402  (not instrumented: coverage of our reader and nibabel is what counts)

with atheris.instrument_imports(include=["inrseg", "nibabel"]):
    import nibabel as nib

    from inrseg.data import io as inrseg_io
    from inrseg.errors import InputError

TMP = Path(tempfile.mkdtemp(prefix="inrseg-fuzz-"))
STATS = {"inputs": 0, "input_errors": 0, "accepted": 0}


def seeds() -> list[bytes]:
    """Valid NIfTI files of several kinds, raw (the fuzzer gzips them when byte 0 is odd)."""
    rng = np.random.default_rng(0)
    out = []
    for arr, klass in ((rng.random((6, 5, 1)).astype(np.float32), nib.Nifti1Image),
                       (rng.integers(0, 4, (4, 5, 3)).astype(np.uint8), nib.Nifti1Image),
                       (rng.random((3, 4, 2, 3)).astype(np.float64), nib.Nifti1Image),
                       ((rng.random((5, 5, 2)) * 1000).astype(np.int16), nib.Nifti2Image)):
        img = klass(arr, np.diag([1.5, 1.5, 3.0, 1.0]))
        if arr.dtype == np.int16:
            img.header.set_slope_inter(0.5, 10.0)
        out.append(img.to_bytes())
    return out


def one_input(data: bytes) -> None:
    STATS["inputs"] += 1
    if not data:
        return
    gz = data[0] & 1
    body = data[1:]
    path = TMP / ("x.nii.gz" if gz else "x.nii")
    path.write_bytes(gzip.compress(body, compresslevel=1) if gz and data[0] & 2 else body)
    for reader in (inrseg_io.load_image, inrseg_io.load_labels):
        try:
            reader(path)
            STATS["accepted"] += 1
        except InputError as exc:
            STATS["input_errors"] += 1
            if "\n" in str(exc):
                raise AssertionError(f"multi-line error message: {exc!r}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args, rest = ap.parse_known_args()
    corpus = TMP / "corpus"
    corpus.mkdir()
    for i, s in enumerate(seeds()):
        (corpus / f"seed{i}").write_bytes(b"\x00" + s)              # as .nii
        (corpus / f"seed{i}gz").write_bytes(b"\x03" + s)            # as .nii.gz
    crashes = TMP / "crashes"
    crashes.mkdir()
    t0 = time.perf_counter()
    finding = None
    argv = [sys.argv[0], str(corpus), f"-max_total_time={int(args.minutes * 60)}", "-timeout=60",
            "-rss_limit_mb=3000", "-max_len=4096", f"-artifact_prefix={crashes}/", "-print_final_stats=1", *rest]
    atheris.Setup(argv, one_input)
    try:
        atheris.Fuzz()
    except SystemExit:
        pass
    except BaseException as exc:  # a finding: keep it for the report
        finding = f"{type(exc).__name__}: {exc}"
    report(args, time.perf_counter() - t0, finding, crashes)


def report(args, seconds: float, finding: str | None, crashes: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import write_results

    found = sorted(p.name for p in crashes.iterdir())
    if found and finding is None:
        finding = f"{len(found)} crashing input(s), see the log"
    rows = (f"| inputs tried | {STATS['inputs']} |\n| read (accepted) | {STATS['accepted']} |\n"
            f"| refused with InputError | {STATS['input_errors']} |\n| wall time | {seconds / 60:.1f} min |\n"
            f"| findings | {finding or 'none'} |\n| saved crash inputs | {', '.join(found) or 'none'} |")
    write_results("fuzz-nifti", {"Fuzz run of the NIfTI reader": "| | |\n|---|---|\n" + rows},
                  f"atheris {getattr(atheris, '__version__', '')} (libFuzzer), seed corpus of "
                  f"{len(seeds()) * 2} valid files, max input 4 KiB, INRSEG_MAX_MEMORY_GB=1; every input "
                  f"read by load_image and load_labels; only InputError is acceptable.")
    print(rows)


if __name__ == "__main__":
    main()
