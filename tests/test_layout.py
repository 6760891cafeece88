"""The repository keeps its shape: one stem per concept, explicit exports, lint-clean code."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import qcourse

ROOT = Path(__file__).resolve().parent.parent
# Modules that serve several chapters rather than being one chapter's library.
SHARED_MODULES = {"__init__", "datasets", "nn", "bench", "grading"}
# Chapter modules the package exports as modules, not name by name.


# Pages of the book that are not chapters with a module and exercises.
NON_CHAPTER_PAGES = {"intro", "references", "grading"}


def chapter_stems() -> list[str]:
    # book/*.md only: the self-study pages in book/exercises/ are not chapters (see below).
    return sorted(p.stem for p in (ROOT / "book").glob("*.md") if p.stem not in NON_CHAPTER_PAGES)


def _top_level_modules() -> list[str]:
    """qcourse's modules and subpackages by name (a package is a folder with __init__.py)."""
    files = [p.stem for p in (ROOT / "qcourse").glob("*.py")]
    packages = [p.parent.name for p in (ROOT / "qcourse").glob("*/__init__.py")]
    return files + packages


def library_modules() -> list[str]:
    return sorted(s for s in _top_level_modules() if s not in SHARED_MODULES)


def shared_modules() -> list[str]:
    return sorted(s for s in _top_level_modules() if s in SHARED_MODULES and s != "__init__")


@pytest.mark.parametrize("stem", chapter_stems())
def test_each_chapter_has_module_tests_and_exercises(stem):
    for path in (f"qcourse/{stem}.py", f"tests/test_{stem}.py", f"notebooks/{stem}.ipynb"):
        assert (ROOT / path).is_file(), f"book/{stem}.md has no {path}"


def test_each_exercise_notebook_has_one_self_study_page_and_a_chapter():
    """notebooks/STEM.ipynb <-> book/exercises/STEM.md (`make self-study`) <-> book/STEM.md"""
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    pages = sorted(p.stem for p in (ROOT / "book" / "exercises").glob("*.md"))
    assert pages == notebooks, (
        f"book/exercises/ has {pages}, notebooks/ has {notebooks}: run `make self-study`")
    for stem in notebooks:
        assert stem in chapter_stems(), f"notebooks/{stem}.ipynb has no chapter book/{stem}.md"


@pytest.mark.parametrize("stem", library_modules())
def test_each_module_has_its_tests(stem):
    test_file = f"tests/test_{stem}.py"
    assert (ROOT / test_file).is_file(), f"qcourse/{stem}.py has no {test_file}"


@pytest.mark.parametrize("stem", library_modules() + shared_modules())
def test_module_declares_all_and_the_package_exports_it(stem):
    module = importlib.import_module(f"qcourse.{stem}")
    assert hasattr(module, "__all__"), f"qcourse.{stem} has no __all__"
    for name in module.__all__:
        assert hasattr(module, name), f"qcourse.{stem}.__all__ names a missing {name}"
    if stem in SHARED_MODULES or getattr(qcourse, stem, None) is module:
        return  # shared, or exported as a module (qcourse.deploy.<name>), not name by name
    tree = ast.parse((ROOT / "qcourse/__init__.py").read_text())
    imported = {
        alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module == f"qcourse.{stem}"
        for alias in node.names
    }
    assert imported == set(module.__all__), f"qcourse/__init__.py imports {imported} from {stem}"
    for name in module.__all__:
        assert getattr(qcourse, name) is getattr(module, name)


def test_top_level_all_is_complete():
    assert sorted(qcourse.__all__) == sorted(set(qcourse.__all__))
    for name in qcourse.__all__:
        assert hasattr(qcourse, name)


def test_ruff_is_clean():
    ruff = Path(sys.executable).with_name("ruff")
    proc = subprocess.run([str(ruff), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_top_level_layout():
    for name in ("book", "notebooks", "qcourse", "tests", "_config.yml", "_toc.yml",
                 "requirements.txt", "pyproject.toml", "Makefile", "README.md", ".ci/run"):
        assert (ROOT / name).exists(), f"{name} is missing"
    reqs = (ROOT / "requirements.txt").read_text()
    assert "jupyter-book==1.0.4.post1" in reqs
