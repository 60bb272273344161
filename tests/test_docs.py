"""The documentation stays a user guide whose every link resolves.

* the README is at most 250 lines;
* every relative markdown link and every ``benchmarks/results/...`` path named in the README,
  ``docs/**/*.md`` and ``benchmarks/configs/README.md`` is a file or folder of the repository (and
  not one that git ignores: a clean clone would lack it);
* every registered method has its page under ``docs/methods/`` and a row in the README's table;
* every override file in ``benchmarks/configs/`` resolves to a config of its method (the file name
  starts with the method) and is listed in that folder's README.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIGS = ROOT / "benchmarks" / "configs"
MAX_README_LINES = 250

#: ``[text](target)`` and ``![alt](target "title")``; the target has no spaces
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
#: a results path named in prose or code, e.g. `benchmarks/results/2026-11-22-engine-speed.md`
RESULTS_PATH = re.compile(r"benchmarks/results/[A-Za-z0-9_.+\-/<>*{}]*")


def doc_files() -> list[Path]:
    files = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    if (CONFIGS / "README.md").exists():
        files.append(CONFIGS / "README.md")
    return files


def link_targets(path: Path) -> list[tuple[str, Path]]:
    """``(as written, resolved path)`` of every relative link and results path in ``path``."""
    text = path.read_text(encoding="utf-8")
    out = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s), mailto: ... and anchors within the page
        out.append((target, (path.parent / target.split("#", 1)[0]).resolve()))
    for m in RESULTS_PATH.finditer(text):
        written = m.group(0).rstrip(".")
        if any(c in written for c in "<>*{}"):
            continue  # a pattern (`benchmarks/results/<date>-nisf-cine.md`), not a file
        out.append((written, (ROOT / written).resolve()))
    return out


def git_ignored(paths: list[Path]) -> set[Path]:
    """Those of ``paths`` that git ignores (empty outside a git checkout)."""
    if not paths or shutil.which("git") is None or not (ROOT / ".git").exists():
        return set()
    proc = subprocess.run(["git", "check-ignore", "--stdin"], cwd=ROOT, capture_output=True, text=True,
                          input="\n".join(str(p.relative_to(ROOT)) for p in paths), timeout=60)
    return {(ROOT / line).resolve() for line in proc.stdout.splitlines() if line}


def test_readme_is_at_most_250_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"


def test_link_checker_sees_links_and_results_paths(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](b.md#x) ![i](img.png \"t\") [w](https://e.org) [s](#here) "
                    "`benchmarks/results/2026-x.md`. `benchmarks/results/<date>-y.md`\n")
    written = [w for w, _ in link_targets(page)]
    assert written == ["b.md#x", "img.png", "benchmarks/results/2026-x.md"]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(path):
    targets = link_targets(path)
    missing = [w for w, p in targets if not p.exists()]
    outside = [w for w, p in targets if p.exists() and ROOT not in (p, *p.parents)]
    ignored = git_ignored([p for _, p in targets if p.exists() and ROOT in p.parents])
    assert not missing, f"{path.relative_to(ROOT)}: links to missing files: {missing}"
    assert not outside, f"{path.relative_to(ROOT)}: links outside the repository: {outside}"
    assert not ignored, (f"{path.relative_to(ROOT)}: links to files git ignores (absent from a clone): "
                         f"{sorted(str(p.relative_to(ROOT)) for p in ignored)}")


def test_every_method_has_its_page_and_readme_row():
    from inrseg.methods.registry import ENTRIES

    readme = README.read_text(encoding="utf-8")
    for name, entry in ENTRIES.items():
        assert entry.doc, f"{name}: no doc page named in its registry entry"
        assert (ROOT / entry.doc).is_file(), f"{name}: its page {entry.doc} is missing"
        assert f"| `{name}` |" in readme, f"{name}: no row in the README's methods table"


def override_files() -> list[Path]:
    return sorted(p for p in CONFIGS.glob("*") if p.suffix in (".toml", ".json"))


def test_there_are_override_files():
    assert override_files(), "benchmarks/configs/ holds no override file"


@pytest.mark.parametrize("path", override_files(), ids=lambda p: p.name)
def test_override_file_resolves(path):
    from inrseg.methods.configs import read_override_file
    from inrseg.methods.registry import ENTRIES, resolve

    method = next((m for m in sorted(ENTRIES, key=len, reverse=True) if path.name.startswith(m + "-")), None)
    assert method is not None, f"{path.name}: the name does not start with a method ({', '.join(ENTRIES)})"
    _, cfg = resolve(method, 2, config_file=path)
    cls = ENTRIES[method].config_recipe.config_class
    assert type(cfg) is cls
    _, fields = read_override_file(cls, path)
    assert {k: getattr(cfg, k) for k in fields} == fields, f"{path.name}: not every field reaches the config"
    assert path.name in (CONFIGS / "README.md").read_text(encoding="utf-8"), \
        f"{path.name} is not listed in benchmarks/configs/README.md"
