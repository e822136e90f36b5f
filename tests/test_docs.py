"""The layout in docs/code.md matches the tree: every path it names exists, and every .py file
under seqmodels/ and data_modules/ (tracked by git, or new and not ignored) is named in it.

The layout is the first fenced block under "## Layout". An entry line starts at column 0 with
a path (a folder ends with "/"); indented lines continue the entry above. A name in an entry,
with or without folders, is looked up in the entry's folder (the path itself for a folder, its
parent for a file) and then at the repository root.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
CODE_MD = ROOT / "docs" / "code.md"
CHECKED = ("seqmodels", "data_modules")  # every .py file under these must be named

# a file name with one of these extensions, or a folder (ends with "/"), not part of a longer word
# (``$XDG_CACHE_HOME/...``, ``~/.cache/...``, ``torch.utils.cpp_extension`` are not paths)
_FILE = r"(?:[\w.-]+/)*[\w-][\w.-]*\.(?:py|cpp|h|sh|yaml|md|toml)"
_DIR = r"(?:[\w.-]+/)+"
PATH = re.compile(rf"(?<![\w/.$~-])(?:{_FILE}|{_DIR})(?![\w/-])")


def layout_block(text: str) -> list[str]:
    """The lines of the first fenced block after the "## Layout" heading."""
    heading = re.search(r"^## Layout\s*$", text, re.M)
    assert heading, "docs/code.md has no '## Layout' heading"
    fence = re.search(r"^```[^\n]*\n(.*?)^```", text[heading.end():], re.M | re.S)
    assert fence, "docs/code.md: no fenced block under '## Layout'"
    return fence.group(1).splitlines()


def named_paths(lines: list[str]) -> tuple[dict[str, str], list[str]]:
    """(repository path -> the layout line naming it, names that match no path)."""
    named: dict[str, str] = {}
    missing: list[str] = []
    base = PurePosixPath(".")
    for line in lines:
        if not line.strip():
            continue
        tokens = [m.group(0) for m in PATH.finditer(line)]
        if not line[0].isspace():  # an entry: its first word is a path, whatever it looks like
            first = line.split()[0]
            entry = PurePosixPath(first.rstrip("/"))
            base = entry if first.endswith("/") else entry.parent
            tokens = [first] + [t for t in tokens if t != first]
        for token in tokens:
            for candidate in (base / token.rstrip("/"), PurePosixPath(token.rstrip("/"))):
                if (ROOT / candidate).exists():
                    named[str(candidate)] = line.strip()
                    break
            else:
                missing.append(f"{token!r} in line: {line.strip()}")
    return named, missing


def python_files() -> set[str]:
    """The .py files under CHECKED: git's tracked and new (not ignored) ones that exist; without
    git, every .py file there."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", *CHECKED],
                             cwd=ROOT, capture_output=True, text=True, check=True, timeout=30).stdout
        files = {f for f in out.split("\0") if f.endswith(".py")}
    except (OSError, subprocess.SubprocessError):
        files = {str(p.relative_to(ROOT).as_posix()) for d in CHECKED for p in (ROOT / d).rglob("*.py")
                 if "__pycache__" not in p.parts}
    return {f for f in files if (ROOT / f).is_file()}


def test_layout_names_every_python_file_and_only_paths_that_exist():
    named, missing = named_paths(layout_block(CODE_MD.read_text(encoding="utf-8")))
    unnamed = sorted(python_files() - set(named))
    problems = []
    if missing:
        problems.append("named in docs/code.md's layout but not in the repository (fix or remove):\n  "
                        + "\n  ".join(missing))
    if unnamed:
        problems.append("in the repository but not named in docs/code.md's layout (add each with a few words; "
                        "a name without a folder is looked up in its line's folder):\n  " + "\n  ".join(unnamed))
    assert not problems, "\n".join(problems)


def test_the_layout_check_sees_what_is_wrong():
    """The parser on a planted layout: a missing path is reported, names resolve in their
    line's folder and at the root, and words that only look like paths are ignored."""
    lines = ["seqmodels/bptt/             reference.py, fast.py, docs/bptt.md; no_such_file.py",
             "                            gpu.py (continued line)",
             "seqmodels/fused.py          builds csrc/ under $XDG_CACHE_HOME/x and ~/.cache/y, torch.utils.cpp_extension",
             "nowhere/                    x"]
    named, missing = named_paths(lines)
    assert {"seqmodels/bptt/reference.py", "seqmodels/bptt/fast.py", "seqmodels/bptt/gpu.py", "docs/bptt.md",
            "seqmodels/fused.py", "seqmodels/csrc"} <= set(named)
    assert [m.split()[0] for m in missing] == ["'no_such_file.py'", "'nowhere/'"]
