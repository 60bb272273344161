"""Coverage-guided fuzzing of the NIfTI reader (issue 13): random bytes and mutated headers.

    pip install atheris
    python tests/fuzz_nifti.py --minutes 30
    python tests/fuzz_nifti.py --parse-log LOG    # the report of an earlier run's output

Every input is written as a ``.nii`` or a ``.nii.gz`` (by its first byte) and read with
``load_image`` and ``load_labels``. The only acceptable failure is
:class:`~inrseg.core.errors.InputError` (a one-line message naming the file); anything else (an
uncaught exception, a MemoryError, a hang) is a finding: the input is saved and the run stops.
The seed corpus is a handful of valid files (2D, 3D, 4D; float, integer, scaled; NIfTI-1 and
NIfTI-2). Memory is capped with ``INRSEG_MAX_MEMORY_GB=1`` so that a header claiming a huge
image must be refused by the size checks, not by the machine.

The fuzzing runs in a child process (libFuzzer ends its process with ``exit()``); the parent
writes ``benchmarks/results/<date>-fuzz-nifti.md`` (``INRSEG_RESULTS=DIR``: into ``DIR``) with
the number of inputs run, the coverage reached and the findings (crashing inputs are kept under
the run's temporary folder). Not collected by pytest (no ``test_`` prefix): it runs for minutes
and needs atheris.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("INRSEG_MAX_MEMORY_GB", "1")
logging.getLogger("nibabel").setLevel(logging.CRITICAL)  # its warnings about odd headers: noise here

import atheris  # noqa: E402
import numpy as np  # noqa: E402  (not instrumented: coverage of our reader and nibabel is what counts)

with atheris.instrument_imports(include=["inrseg", "nibabel"]):
    import nibabel as nib

    from inrseg.data import nifti as inrseg_nifti
    from inrseg.core.errors import InputError

TMP = Path(tempfile.mkdtemp(prefix="inrseg-fuzz-"))
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("INRSEG_RESULTS", REPO / "benchmarks" / "results"))
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
    for reader in (inrseg_nifti.load_image, inrseg_nifti.load_labels):
        try:
            reader(path)
            STATS["accepted"] += 1
        except InputError as exc:
            STATS["input_errors"] += 1
            if "\n" in str(exc):
                raise AssertionError(f"multi-line error message: {exc!r}") from None


def child(minutes: float, corpus: Path, crashes: Path, stats_path: Path, rest: list[str]) -> None:
    """The fuzzing process itself (libFuzzer ends it with exit(), so the parent reports)."""
    def counted(data: bytes) -> None:
        one_input(data)
        if STATS["inputs"] % 5000 == 0:
            stats_path.write_text(json.dumps(STATS))

    argv = [sys.argv[0], str(corpus), f"-max_total_time={int(minutes * 60)}", "-timeout=60",
            "-rss_limit_mb=3000", "-max_len=4096", f"-artifact_prefix={crashes}/", "-print_final_stats=1", *rest]
    atheris.Setup(argv, counted)
    atheris.Fuzz()


def parse_log(log: str) -> dict:
    """libFuzzer's final figures and the crash artifacts from its output."""
    out = {}
    m = re.search(r"Done (\d+) runs in (\d+) second", log)
    if m:
        out["runs"], out["seconds"] = int(m.group(1)), int(m.group(2))
    for key in ("new_units_added", "peak_rss_mb", "average_exec_per_sec"):
        m = re.search(rf"stat::{key}:\s+(\d+)", log)
        if m:
            out[key] = int(m.group(1))
    m = re.findall(r"cov: (\d+) ft: (\d+)", log)
    if m:
        out["coverage"], out["features"] = map(int, m[-1])
    out["crashes"] = re.findall(r"Test unit written to (\S+)", log)
    out["errors"] = sorted(set(re.findall(r"^(\w+(?:Error|Exception)): .*$", log, flags=re.M)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--parse-log", type=Path, default=None,
                    help="write the report from the output of an earlier run instead of fuzzing")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.child is not None:
        child(args.minutes, args.child / "corpus", args.child / "crashes", args.child / "stats.json", rest)
        return
    if args.parse_log is not None:
        report(parse_log(args.parse_log.read_text(errors="replace")), {}, args.minutes, f"--parse-log {args.parse_log.name}")
        return
    work = TMP
    (work / "corpus").mkdir()
    (work / "crashes").mkdir()
    for i, s in enumerate(seeds()):
        (work / "corpus" / f"seed{i}").write_bytes(b"\x00" + s)              # as .nii
        (work / "corpus" / f"seed{i}gz").write_bytes(b"\x03" + s)            # as .nii.gz
    log_path = work / "fuzz.log"
    with open(log_path, "w") as log:
        subprocess.run([sys.executable, __file__, "--minutes", str(args.minutes), "--child", str(work), *rest],
                       stdout=log, stderr=subprocess.STDOUT, check=False)
    stats = json.loads((work / "stats.json").read_text()) if (work / "stats.json").exists() else {}
    report(parse_log(log_path.read_text(errors="replace")), stats, args.minutes, "")


def write_results(name: str, sections: dict[str, str], notes: str = "") -> Path:
    """Write ``RESULTS/<date>-<name>.md`` (a second run the same day gets ``-2``, ...) with the
    date, commit, machine and command."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    path = RESULTS / f"{now:%Y-%m-%d}-{name}.md"
    k = 1
    while path.exists():
        k += 1
        path = RESULTS / f"{now:%Y-%m-%d}-{name}-{k}.md"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    machine = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    body = [f"# {name}", "", f"- date: {now:%Y-%m-%d %H:%M} UTC", f"- commit: {commit}",
            f"- machine: {machine}", f"- command: `{' '.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}`", ""]
    if notes:
        body += [notes, ""]
    for title, table in sections.items():
        body += [f"## {title}", "", table, ""]
    path.write_text("\n".join(body))
    return path


def report(fz: dict, stats: dict, minutes: float, how: str) -> None:
    def cell(v):
        return "n/a" if v is None else v

    rows = [("inputs run (libFuzzer)", fz.get("runs")), ("wall time (s)", fz.get("seconds")),
            ("inputs / s", fz.get("average_exec_per_sec")), ("coverage edges / features", 
             f"{fz.get('coverage')} / {fz.get('features')}"),
            ("new corpus units", fz.get("new_units_added")), ("peak RSS (MB)", fz.get("peak_rss_mb")),
            ("reads accepted (sampled every 5,000 inputs)", stats.get("accepted")),
            ("reads refused with InputError (sampled)", stats.get("input_errors")),
            ("crashes (uncaught exceptions)", len(fz.get("crashes", [])) or "none"),
            ("exception types seen", ", ".join(fz.get("errors", [])) or "none")]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {cell(v)} |" for k, v in rows)
    write_results("fuzz-nifti", {"Fuzz run of the NIfTI reader": table},
                  f"atheris (libFuzzer), {minutes:g} min, seed corpus of {len(seeds()) * 2} valid files, max input "
                  f"4 KiB, INRSEG_MAX_MEMORY_GB=1; every input read by load_image and load_labels; only "
                  f"InputError is acceptable. {how}")
    print(table)


if __name__ == "__main__":
    main()
