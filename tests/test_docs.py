"""The README and every docs page run as written: each fenced block marked ``runnable``
(```` ```bash runnable ```` or ```` ```python runnable ````) is executed, in order, in a fresh directory
holding the output of ``engram-hf quickstart --preset smoke`` (what README command 1 leaves), so
the documentation cannot drift from the code."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```(bash|python) runnable\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[tuple[str, str]]:
    return _BLOCK.findall(page.read_text(encoding="utf-8"))


def test_every_docs_page_starts_with_a_runnable_command_and_every_link_resolves():
    for page in DOCS[1:]:
        text = page.read_text(encoding="utf-8")
        first = re.search(r"^```(\S*)", text, re.M)
        assert first and first.group(1) in ("bash", "python") and blocks(page), f"{page.name} starts with no command"
        assert text.index("```") < text.index("\n## ") if "\n## " in text else True, page.name
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text(encoding="utf-8")):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, quickstart_dir):
    root = tmp_path_factory.mktemp("docs")
    (root / "docs").symlink_to(REPO / "docs")
    (root / "runs").mkdir()
    (root / "runs" / "quickstart").symlink_to(quickstart_dir)
    return root


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env.pop("TRITON_INTERPRET", None)  # as a user runs them (the compile check refuses the interpreter)
    return env


def _run(cwd: Path, kind: str, code: str) -> str:
    bindir = str(Path(sys.executable).parent)
    env = _env()
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])  # this environment's engram-hf first
    cmd = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{kind} block failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_page_runs_as_written(workdir, page):
    found = blocks(page)
    assert found or page.name == "README.md"
    for kind, code in found:
        _run(workdir, kind, code)
