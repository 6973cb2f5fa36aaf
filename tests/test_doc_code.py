"""Every ```python block of README.md and of the docs' Markdown pages runs as written.

Each block is executed on its own, in a fresh namespace and a temporary working
directory, so a block that forgets an import (or relies on an earlier block)
fails here. Blocks that are not meant to run use another fence (```bash, ```text).
"""

import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # compiles every block: tens of seconds in all

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("_build", "api", "gallery", "_generated")
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for path in sorted((ROOT / "docs").rglob("*.md")):
        if not any(part in GENERATED for part in path.relative_to(ROOT / "docs").parts):
            files.append(path)
    return files


def python_blocks() -> list[tuple[str, int, str]]:
    blocks = []
    for path in markdown_files():
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((str(path.relative_to(ROOT)), line, match.group(1)))
    return blocks


BLOCKS = python_blocks()


def test_there_are_blocks():
    assert any(name == "README.md" for name, _, _ in BLOCKS)


@pytest.mark.parametrize("name,line,code", BLOCKS, ids=[f"{n}:{line}" for n, line, _ in BLOCKS])
def test_block_runs(name, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace = {"__name__": f"doc_block_{Path(name).stem}_{line}"}
    exec(compile(code, f"{name}:{line}", "exec"), namespace)  # noqa: S102 - running the docs is the test
    os.chdir(ROOT)
