"""The book build executes the chapters: a failing cell fails it, and no page goes stale.

The chapters are executed once in ``make test``, by the book build (``tests/book_build.py``)
with ``nb_execution_raise_on_error``: an ``assert`` that fails in a chapter fails the build and
so ``test_book.py``. The first test proves that on a small book with one broken chapter.

"No stale page": ``make book`` after a change under ``qcourse/`` executes again every chapter
that imports the changed module, directly or through the library's own imports
(``book/_ext/qcourse_deps.py``). The second test builds a small book twice with the same
command as ``make book``: between the builds it changes a module that one chapter imports only
through another module (no literal-include, no change to the chapter), and checks that this
chapter shows the new value while the other chapter was not executed again. With the
extension switched off, the same edit leaves the page stale: the test can fail. The last tests
check the real book's configuration and what the extension computes for its chapters.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXT = ROOT / "book" / "_ext"
JB = Path(sys.executable).with_name("jupyter-book")
sys.path.insert(0, str(EXT))
import qcourse_deps  # noqa: E402
from notebook_runner import code_cell as cell  # noqa: E402
from notebook_runner import myst_page  # noqa: E402

pytestmark = pytest.mark.slow


def small_book(folder: Path, chapters: dict[str, str], tracked: list[str]) -> Path:
    """A Jupyter Book 1 project with the book's execution settings and ``qcourse_deps``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "title": "small", "author": "tests", "only_build_toc_files": True,
        "execute": {"execute_notebooks": "force", "timeout": 120, "allow_errors": False},
        "sphinx": {"config": {"nb_execution_raise_on_error": True,
                              "qcourse_tracked_packages": tracked},
                   "local_extensions": {"qcourse_deps": str(EXT)}},
    }
    (folder / "_config.yml").write_text(yaml.safe_dump(config))
    names = list(chapters)
    toc = {"format": "jb-book", "root": names[0],
           "chapters": [{"file": n} for n in names[1:]]}
    (folder / "_toc.yml").write_text(yaml.safe_dump(toc))
    for name, body in chapters.items():
        (folder / f"{name}.md").write_text(myst_page(body))
    return folder


def build(folder: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(JB), "build", str(folder), "-W", "-n", "--keep-going"],
                          capture_output=True, text=True, timeout=900, cwd=folder,
                          env={**os.environ, **(env or {})})


def page_text(folder: Path, name: str) -> str:
    return re.sub(r"<[^>]+>", "", (folder / "_build" / "html" / f"{name}.html").read_text())


def test_a_failing_assert_in_a_chapter_fails_the_build(tmp_path):
    book = small_book(tmp_path / "book", {
        "intro": "# Intro\n\nNo code.\n",
        "broken": "# Broken\n" + cell("x = 2 + 2") + cell("assert x == 5, 'arithmetic is broken'"),
    }, tracked=[])
    proc = build(book)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "arithmetic is broken" in proc.stdout + proc.stderr


def toy_package(where: Path, value: int) -> None:
    pkg = where / "toypkg"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "alpha.py").write_text("from toypkg.beta import VALUE\n\n\ndef value():\n"
                                  "    return VALUE\n")
    (pkg / "beta.py").write_text(f"VALUE = {value}\n")
    (pkg / "gamma.py").write_text("NAME = 'gamma'\n")


@pytest.mark.parametrize("tracked", [["toypkg"], []], ids=["extension-on", "extension-off"])
def test_a_library_change_re_executes_the_chapter_that_imports_it(tmp_path, tracked):
    libs = tmp_path / "libs"
    toy_package(libs, 1111)
    book = small_book(tmp_path / "book", {
        "intro": "# Intro\n\nNo code.\n",
        # uses beta only through alpha: nothing in this page names beta
        "uses": "# Uses\n" + cell("from toypkg.alpha import value\nprint('VALUE IS', value())"),
        "other": "# Other\n" + cell("import uuid\n\nfrom toypkg import gamma\n"
                                    "print('RUN', uuid.uuid4().hex, gamma.NAME)"),
    }, tracked=tracked)
    env = {"PYTHONPATH": os.pathsep.join([str(libs), os.environ.get("PYTHONPATH", "")])}
    first = build(book, env)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    assert "VALUE IS 1111" in page_text(book, "uses")
    other_run = re.search(r"RUN [0-9a-f]{32}", page_text(book, "other")).group(0)

    toy_package(libs, 2222)  # change beta.py only
    second = build(book, env)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-2000:]
    uses = page_text(book, "uses")
    if tracked:
        assert "VALUE IS 2222" in uses, "the chapter was not executed again after beta changed"
        assert "[qcourse_deps] uses: re-executed" in second.stdout
        assert other_run in page_text(book, "other"), "an unaffected chapter was executed again"
    else:  # without the extension, Sphinx keeps the old page: what this extension is for
        assert "VALUE IS 1111" in uses


def test_the_book_tracks_qcourse_and_executes_what_it_reads():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "force"
    assert config["sphinx"]["local_extensions"].get("qcourse_deps") == "book/_ext"
    assert config["sphinx"]["config"]["nb_execution_raise_on_error"] is True


def test_chapters_depend_on_the_modules_they_import_and_on_the_compiled_kernels():
    roots = {"qcourse": qcourse_deps._package_root("qcourse")}
    source = (ROOT / "book" / "ptq.md").read_text()
    code = "\n".join(qcourse_deps._CODE_CELL.findall(source))
    files = {p.relative_to(ROOT).as_posix() for p in qcourse_deps.dependencies(code, roots)}
    assert "qcourse/ptq.py" in files and "qcourse/__init__.py" in files
    assert any(f.startswith("qcourse/nn/") and f.endswith(".py") for f in files)
    assert any(f.startswith("qcourse/_kernels") and f.endswith(".so") for f in files)
    intro = (ROOT / "book" / "intro.md").read_text()
    assert qcourse_deps.dependencies("\n".join(qcourse_deps._CODE_CELL.findall(intro)),
                                     roots) == set()
    # a recorded hash that no longer matches marks the page stale, naming the file
    recorded = {"book/ptq": {str(ROOT / f): qcourse_deps._digest(ROOT / f) for f in files},
                "book/intro": {}}
    assert qcourse_deps.stale_documents(recorded) == {}
    some = sorted(recorded["book/ptq"])[0]
    recorded["book/ptq"][some] = "0" * 64
    assert qcourse_deps.stale_documents(recorded) == {"book/ptq": [some]}
