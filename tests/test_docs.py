"""The docs, tried as a new user would: every runnable snippet and command in them runs as written.

Convention: fenced ```python blocks are runnable and executed here; ```py blocks are
outlines (they name a user's own loaders or a Hub download) and are not. In ```bash blocks,
``.venv/bin/...`` commands run here; ``bash scripts/*.sh`` are the README's two commands,
which CI and the fresh-clone check run themselves. recipes.md is executed by
tests/test_recipe_docs.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import timm_dgate
from timm_dgate.boundaries import discovery

from .markdown import fenced_blocks

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OWN_COMMANDS = ("bash scripts/setup.sh", "bash scripts/demo.sh", "bash scripts/test.sh")


def shell_commands(path: Path) -> list[str]:
    lines = [line.split(" #")[0].strip() for body in fenced_blocks(path, "bash") for line in body.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def runnable_docs() -> list[Path]:
    """Docs with runnable snippets; the quickstart has its own, stricter test below."""
    return [p for p in DOCS if p.name not in ("recipes.md", "quickstart.md") and fenced_blocks(p, "python")]


@pytest.fixture
def demo_workdir(tmp_path, monkeypatch, trained_backbone):
    """A working directory where the demo has left its backbone (a tiny timm model, trained the demo's way,
    stands in for resnet18: a random one scores chance, which calibration refuses)."""
    shutil.copytree(trained_backbone, tmp_path / "runs/demo/backbone")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(discovery, "_FAMILY_RULES", dict(discovery._FAMILY_RULES))  # snippets may register
    return tmp_path


@pytest.mark.parametrize("doc", runnable_docs(), ids=lambda p: p.name)
def test_python_snippets_run_as_written(doc, demo_workdir, capsys):
    for code in fenced_blocks(doc, "python"):
        exec(compile(code, str(doc), "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out  # every runnable snippet shows the reader something


def test_quickstart_runs_alone_and_leaves_a_loadable_folder_with_its_profiles(tmp_path, monkeypatch):
    """Copied into an empty folder, the quick start trains the small backbone it needs, then runs through."""
    monkeypatch.chdir(tmp_path)
    (code,) = fenced_blocks(ROOT / "docs/quickstart.md", "python")
    exec(compile(code, "quickstart.md", "exec"), {"__name__": "__docs__"})
    assert (tmp_path / "runs/quickstart/backbone/model.safetensors").is_file()
    loaded = timm_dgate.from_pretrained(tmp_path / "resnet18-fmnist-dgate")
    assert set(loaded.profiles) == {"-0.5pt", "budget"}
    assert all(p.test["split"] == "test" for p in loaded.profiles.values())


@pytest.mark.parametrize("doc", [p for p in DOCS if p.name != "recipes.md" and shell_commands(p)], ids=lambda p: p.name)
def test_shell_commands_run_as_written(doc, tmp_path):
    bin_dir = Path(sys.executable).parent
    for command in shell_commands(doc):
        if command in OWN_COMMANDS:
            continue
        assert command.startswith(".venv/bin/"), f"{doc.name}: unexpected command {command!r}"
        argv = shlex.split(command)
        argv[0] = str(bin_dir / Path(argv[0]).name)
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=os.environ)
        assert done.returncode == 0, f"{doc.name}: {command}\n{done.stderr[-2000:]}"


def test_api_reference_lists_exactly_the_public_names():
    """Every name in ``__all__`` has its section, and every section names something public: a root name,
    a member of one (``Cascade.from_pretrained``), or a module path that imports."""
    api = (ROOT / "docs/api.md").read_text()
    missing = [name for name in timm_dgate.__all__ if name != "__version__" and f"`{name}" not in api]
    assert not missing, f"docs/api.md does not document {missing}"
    for heading in re.findall(r"^### `([^`(]+)", api, flags=re.M):
        root = heading.partition(".")[0]
        if root == "timm_dgate":  # a module path, or a name in a module
            module, _, name = heading.strip().rpartition(".")
            owner = importlib.import_module(module)
            assert hasattr(owner, name) or importlib.util.find_spec(f"{module}.{name}"), heading
        else:
            assert root in timm_dgate.__all__, f"docs/api.md documents {heading!r}, which timm_dgate does not export"


def test_every_doc_link_resolves():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#:]+\.(?:md|png))\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"


def test_benchmark_scripts_the_docs_name_exist_and_benchmarks_readme_maps_every_one():
    """Docs quote benchmark commands by path (``benchmarks/<folder>/<script>.py``); benchmarks/README.md lists all."""
    readme = ROOT / "benchmarks" / "README.md"
    for doc in [*DOCS, readme]:
        for path in re.findall(r"(?<![\w/])benchmarks/[\w/]+\.py", doc.read_text()):
            assert (ROOT / path).is_file(), f"{doc.name} names {path}, which does not exist"
    scripts = sorted(p.relative_to(readme.parent).as_posix() for p in readme.parent.rglob("*.py"))
    unlisted = [s for s in scripts if not s.endswith("__init__.py") and f"`{s}`" not in readme.read_text()]
    assert not unlisted, f"benchmarks/README.md does not list {unlisted}"
