"""Binder's view of the repository, checked without Docker, and a fresh environment built as
Binder builds it.

repo2docker (the tool behind mybinder.org) reads ``runtime.txt``, ``requirements.txt``,
``pyproject.toml`` and ``postBuild``; with ``--no-build --debug`` it prints the Dockerfile it
would build, and the tests assert the lines that matter: the Python version, the pinned
requirements, qcourse built from the repository (``pip install .``, not editable) and
``postBuild``, in that order. ``postBuild`` itself runs here in a scratch directory.

The fresh-environment test makes a new virtual environment from ``requirements.txt`` and the
repository alone (``pip install -r requirements.txt`` then ``pip install .``), imports qcourse
with its compiled kernels from it, and runs a chapter in it. It takes minutes (pip installs from
its cache or PyPI), so it runs only when QCOURSE_FRESH_ENV=1 (see the README).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbformat.v4 import new_code_cell
from notebook_runner import ROOT, chapters, exercise_notebooks

BIN = Path(sys.executable).parent


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _repo2docker() -> str:
    exe = shutil.which("jupyter-repo2docker", path=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    if exe is None:
        pytest.skip("jupyter-repo2docker is not installed (pip install jupyter-repo2docker)")
    return exe


@pytest.fixture(scope="module")
def dockerfile(tmp_path_factory) -> tuple[str, str]:
    exe = _repo2docker()
    cwd = tmp_path_factory.mktemp("r2d")
    proc = subprocess.run([exe, "--no-build", "--debug", str(ROOT)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, proc.stderr


def test_repository_is_a_binder_package_without_a_binder_folder():
    # repo2docker uses binder/ or .binder/ instead of the root files when either exists.
    for name in ("binder", ".binder"):
        assert not (ROOT / name).exists(), f"{name}/ would hide the root Binder files"
    project = _pyproject()
    assert "project" in project and "build-system" in project
    assert os.access(ROOT / "postBuild", os.X_OK), "postBuild must be executable"


def test_runtime_matches_the_supported_pythons():
    runtime = (ROOT / "runtime.txt").read_text().strip()
    match = re.fullmatch(r"python-(\d+)\.(\d+)", runtime)
    assert match, f"runtime.txt must read python-X.Y, not {runtime!r}"
    version = tuple(map(int, match.groups()))
    requires = _pyproject()["project"]["requires-python"]
    low = tuple(map(int, re.fullmatch(r">=(\d+)\.(\d+)", requires).groups()))
    assert version >= low, f"runtime.txt {runtime} is older than requires-python {requires}"


def test_dockerfile_installs_requirements_builds_qcourse_and_runs_postbuild(dockerfile):
    text, log = dockerfile
    runtime = (ROOT / "runtime.txt").read_text().strip().removeprefix("python-")
    assert f"python={runtime}" in log, f"repo2docker did not take Python {runtime}:\n{log}"
    lines = [ln.strip() for ln in text.splitlines()]

    def index(pattern: str) -> int:
        hits = [i for i, ln in enumerate(lines) if re.search(pattern, ln)]
        assert hits, f"no line matching {pattern!r} in the Dockerfile:\n{text}"
        return hits[0]

    reqs = index(r'^RUN .*/pip install --no-cache-dir -r "?requirements\.txt"?$')
    package = index(r"^RUN .*/pip install --no-cache-dir \.$")
    post = index(r"^RUN \./postBuild$")
    copy_repo = index(r"^COPY .*src/ \$\{REPO_DIR\}/?$")
    assert copy_repo < reqs < package < post, (
        "expected: copy the repository, pip install -r requirements.txt, pip install ., "
        f"postBuild; got lines {copy_repo}, {reqs}, {package}, {post}")
    assert not any(re.search(r"pip install .*(-e|--editable)", ln) for ln in lines), (
        "Binder must install qcourse from the repository, not editable")


def test_postbuild_releases_the_exercises_and_opens_chapters_as_notebooks(tmp_path):
    settings = tmp_path / "settings"
    settings.mkdir()
    (settings / "overrides.json").write_text(json.dumps(
        {"@jupyterlab/apputils-extension:themes": {"theme": "JupyterLab Dark"}}))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               QCOURSE_LAB_SETTINGS_DIR=str(settings))
    proc = subprocess.run(["bash", str(ROOT / "postBuild")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    released = sorted(p.stem for p in (tmp_path / "exercises").glob("*.ipynb"))
    assert released == sorted(p.stem for p in exercise_notebooks())
    for stem in released:
        text = (tmp_path / "exercises" / f"{stem}.ipynb").read_text()
        nbformat.validate(nbformat.reads(text, as_version=4))
        for marker in ("### BEGIN SOLUTION", "### BEGIN HIDDEN TESTS"):
            assert marker not in text, f"exercises/{stem}.ipynb still contains {marker}"
        assert "raise NotImplementedError()" in text

    overrides = json.loads((settings / "overrides.json").read_text())
    viewers = overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert viewers["markdown"] == viewers["myst"] == "Jupytext Notebook"
    assert overrides["@jupyterlab/apputils-extension:themes"] == {"theme": "JupyterLab Dark"}, (
        "postBuild must keep the settings it found")


# --------------------------------------------------------------------------------------------
# A fresh environment, as Binder builds it.

FRESH = os.environ.get("QCOURSE_FRESH_ENV") == "1"
PROBE = """\
import sys
import qcourse
from qcourse import _kernels
print("QCOURSE-PROBE", sys.prefix, qcourse.__file__, _kernels.__file__)
"""


def _copy_repository(dest: Path) -> Path:
    """The files a clone has: the repository without environments, builds and caches."""
    ignore = shutil.ignore_patterns(".git", ".venv", "_build", "build", "*.egg-info", "*.so",
                                    "__pycache__", ".pytest_cache", ".hypothesis",
                                    ".ruff_cache", ".ipynb_checkpoints", "_kernels.c")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


@pytest.mark.slow
@pytest.mark.skipif(not FRESH, reason="minutes of pip installs: set QCOURSE_FRESH_ENV=1 to run")
def test_fresh_environment_from_requirements_and_the_repository_runs_a_chapter(tmp_path):
    src = _copy_repository(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("JUPYTER")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
               PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1",
               JUPYTER_DATA_DIR=str(tmp_path / "jupyter-data"), MPLBACKEND="Agg")
    for args in (["-r", "requirements.txt"], ["."]):
        proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *args], cwd=src,
                              env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"pip install {' '.join(args)}:\n{proc.stderr[-4000:]}"

    # Run a chapter that uses the compiled kernels, with a last cell that says where qcourse
    # and the kernel came from; it must be this environment's site-packages, not the repository.
    stems = [p.stem for p in chapters()]
    stem = next((s for s in ("int_matmul", "kernels") if s in stems), stems[0])
    chapter = src / "book" / f"{stem}.md"
    nb = jupytext.read(chapter)
    nb.cells.append(new_code_cell(PROBE))
    run = tmp_path / "run"
    run.mkdir()
    nbformat.write(nb, run / "chapter.ipynb")
    script = (
        "import nbformat, nbclient\n"
        "nb = nbformat.read('chapter.ipynb', as_version=4)\n"
        "nbclient.NotebookClient(nb, timeout=600, kernel_name='python3').execute()\n"
        "print(''.join(o.get('text', '') for o in nb.cells[-1].outputs))\n")
    proc = subprocess.run([str(python), "-c", script], cwd=run, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, f"{stem} failed:\n{proc.stdout[-3000:]}{proc.stderr[-6000:]}"
    probe = next(ln for ln in proc.stdout.splitlines() if ln.startswith("QCOURSE-PROBE"))
    _, prefix, module, kernels = probe.split()
    assert Path(prefix).resolve() == venv.resolve(), f"the kernel ran in {prefix}, not {venv}"
    site = str(venv / "lib")
    assert module.startswith(site) and kernels.startswith(site), probe
    assert kernels.endswith(".so"), f"qcourse._kernels is not compiled: {kernels}"
