"""Binder's view of the repository, checked without Docker, and a fresh environment built as
Binder builds it.

repo2docker (the tool behind mybinder.org) reads ``runtime.txt``, ``requirements.txt``,
``pyproject.toml`` and ``postBuild``; with ``--no-build --debug`` it prints the Dockerfile it
would build, and the tests assert the lines that matter: the Python version, the pinned
requirements, qcourse built from the repository (``pip install .``, not editable) and
``postBuild``, in that order. ``postBuild`` itself runs here in scratch copies of the repository:
as a Binder build, after which no file holds a solution or a hidden test (the scan is shown to
find them after a developer's run, which must delete nothing), and as a developer runs it.

The fresh-environment test makes a new virtual environment from ``requirements.txt`` and the
repository alone (``pip install -r requirements.txt`` then ``pip install .``), runs
``postBuild`` in it as Binder does, imports qcourse with its compiled kernels from it, and runs a
chapter in it. It takes minutes (pip installs from its cache or PyPI), so it runs only when
QCOURSE_FRESH_ENV=1 (see the README).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbformat.v4 import new_code_cell
from notebook_runner import ROOT, chapters, exercise_notebooks

from qcourse import grading
from qcourse.grading.notebook import split_region

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


# --------------------------------------------------------------------------------------------
# postBuild, run in scratch copies of the repository: once as a Binder build, once as a developer
# runs it in a clone.
#
# The Binder run is simulated as closely as a test can: the copy has what a clone has (no
# compiled kernels, no .git), qcourse is "installed" as a plain copy of the package with its
# compiled kernels on PYTHONPATH (what `pip install .` leaves in site-packages) and `python` runs
# without site (-S), so this environment's editable install cannot stand in for it; REPO_DIR and
# NB_USER are set and the script runs from REPO_DIR, as in repo2docker's Dockerfile.

MARKER = re.compile(r"^\s*#+\s*(BEGIN|END) (SOLUTION|HIDDEN TESTS)\b", re.MULTILINE)
SOLUTION_HOLDERS = ("notebooks", "book/exercises")


def _file_lines(path: Path) -> list[str]:
    """A file's lines as a reader of it would see them (a notebook's cell sources and outputs)."""
    text = path.read_bytes().decode("utf-8", errors="ignore")
    if path.suffix == ".ipynb":
        try:
            nb = json.loads(text)
            text = "\n".join(grading.cell_source(c) + "\n" + json.dumps(c.get("outputs", []))
                             for c in nb.get("cells", []))
        except (ValueError, AttributeError):
            pass
    return text.splitlines()


def _tree_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def distinctive_secrets(repo: Path) -> dict[str, str]:
    """Solution and hidden-test lines of ``repo/notebooks/*.ipynb`` -> the notebook they are from,
    leaving out lines that learners see anyway: in another notebook's public cells, or elsewhere
    in the repository outside ``SOLUTION_HOLDERS`` (``rng = np.random.default_rng(5)`` is in the
    library's tests too)."""
    secrets: dict[str, str] = {}
    elsewhere = set()
    for nb in sorted((repo / "notebooks").glob("*.ipynb")):
        source = json.loads(nb.read_text())
        found = grading.secret_lines(source)
        for line in found["solution"] | found["hidden"]:
            secrets[line] = nb.stem
        for cell in source["cells"]:  # what the student release keeps of each cell
            src = grading.cell_source(cell)
            outside, _ = split_region(src, "### BEGIN SOLUTION", "### END SOLUTION")
            public = grading.public_part("\n".join(outside))
            elsewhere.update(line.strip() for line in public.splitlines())
    for path in _tree_files(repo):
        rel = path.relative_to(repo).as_posix()
        if not rel.startswith(tuple(h + "/" for h in SOLUTION_HOLDERS)):
            elsewhere.update(line.strip() for line in _file_lines(path))
    return {line: stem for line, stem in secrets.items() if line not in elsewhere}


def leaks(roots: list[Path], secrets: dict[str, str]) -> list[str]:
    """Files under ``roots`` that hold an nbgrader marker line or a line of ``secrets``."""
    found = []
    for root in roots:
        for path in _tree_files(root):
            lines = _file_lines(path)
            hits = sorted({line.strip() for line in lines} & secrets.keys())
            markers = [m.group(0).strip() for m in MARKER.finditer("\n".join(lines))]
            if hits or markers:
                found.append(f"{path.relative_to(root.parent).as_posix()}: "
                              f"{(markers + hits)[:2]} ({len(markers)} markers, "
                              f"{len(hits)} secret lines)")
    return found


def _scratch_repository(dest: Path) -> Path:
    repo = _copy_repository(dest)
    shutil.rmtree(repo / "exercises", ignore_errors=True)  # a local release, not in a clone
    return repo


def _run_postbuild(tmp: Path, binder: bool) -> dict:
    repo = _scratch_repository(tmp / "repo")
    before = distinctive_secrets(repo)
    settings = tmp / "settings"
    settings.mkdir()
    (settings / "overrides.json").write_text(json.dumps(
        {"@jupyterlab/apputils-extension:themes": {"theme": "JupyterLab Dark"}}))
    scratch_tmp = tmp / "tmp"
    scratch_tmp.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REPO_DIR", "NB_USER", "PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(scratch_tmp),
               QCOURSE_LAB_SETTINGS_DIR=str(settings))
    if binder:
        site = tmp / "site-packages"
        shutil.copytree(ROOT / "qcourse", site / "qcourse",
                        ignore=shutil.ignore_patterns("__pycache__", "*.c"))
        wrapper = tmp / "bin" / "python"
        wrapper.parent.mkdir()
        wrapper.write_text(f'#!/bin/sh\nexec "{BIN / "python"}" -S "$@"\n')
        wrapper.chmod(0o755)
        env.update(PATH=f"{wrapper.parent}{os.pathsep}{env['PATH']}", REPO_DIR=str(repo),
                   NB_USER="jovyan",
                   PYTHONPATH=f"{site}{os.pathsep}{sysconfig.get_paths()['purelib']}")
    proc = subprocess.run(["bash", "./postBuild"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=900)
    return {"repo": repo, "proc": proc, "env": env, "secrets": before, "tmp": scratch_tmp,
            "settings": settings}


@pytest.fixture(scope="module")
def binder_run(tmp_path_factory) -> dict:
    return _run_postbuild(tmp_path_factory.mktemp("binder"), binder=True)


@pytest.fixture(scope="module")
def clone_run(tmp_path_factory) -> dict:
    return _run_postbuild(tmp_path_factory.mktemp("clone"), binder=False)


def _ok(run: dict) -> str:
    proc = run["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_the_scan_looks_for_most_lines_of_every_solution_and_hidden_test(tmp_path):
    secrets = distinctive_secrets(_scratch_repository(tmp_path / "repo"))
    for nb in exercise_notebooks():
        every = grading.secret_lines(json.loads(nb.read_text()))
        lines = every["solution"] | every["hidden"]
        mine = lines & secrets.keys()
        assert len(mine) >= 0.8 * len(lines) > 0, (
            f"{nb.name}: the scan looks for {len(mine)} of its {len(lines)} secret lines")


def test_postbuild_on_binder_leaves_no_solution_and_no_hidden_test(binder_run):
    out = _ok(binder_run)
    repo = binder_run["repo"]
    assert "Binder build" in out and "removing notebooks/" in out, out
    for holder in SOLUTION_HOLDERS:
        assert not (repo / holder).exists(), f"{holder}/ is still in the image"
    assert not list(binder_run["tmp"].iterdir()), "the temporary course directory is left"
    assert not (repo / "_build").exists()
    found = leaks([repo, binder_run["tmp"]], binder_run["secrets"])
    assert not found, "solutions or hidden tests left in the image:\n" + "\n".join(found)


def test_postbuild_on_binder_releases_every_exercise_and_qcourse_still_imports(binder_run):
    _ok(binder_run)
    repo = binder_run["repo"]
    released = sorted(p.stem for p in (repo / "exercises").glob("*.ipynb"))
    assert released == sorted(p.stem for p in exercise_notebooks())
    for stem in released:
        text = (repo / "exercises" / f"{stem}.ipynb").read_text()
        nb = nbformat.reads(text, as_version=4)
        nbformat.validate(nb)
        assert "raise NotImplementedError()" in text
        assert grading.exercises(json.loads(text)), f"exercises/{stem}.ipynb has no graded cells"
    # A learner's kernel starts in exercises/ (a notebook) or book/ (a chapter, via Jupytext).
    probe = "import qcourse, qcourse.grading, qcourse.kernels; print(qcourse.__file__)"
    for cwd in (repo / "exercises", repo / "book"):
        proc = subprocess.run(["python", "-c", probe], cwd=cwd, env=binder_run["env"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "site-packages" in proc.stdout, proc.stdout
    # The chapters Binder opens do not read what postBuild removed.
    for chapter in sorted((repo / "book").glob("*.md")):
        if chapter.stem == "grading" or "format_name: myst" not in chapter.read_text()[:400]:
            continue  # the instructor's chapter has no Binder button (book/_ext)
        code = "\n".join(c.source for c in jupytext.read(chapter).cells if c.cell_type == "code")
        for removed in ("notebooks", "exercises"):
            assert removed not in code, f"{chapter.name} uses {removed}/, which Binder removes"


def test_postbuild_opens_chapters_as_notebooks_and_keeps_other_settings(binder_run):
    _ok(binder_run)
    overrides = json.loads((binder_run["settings"] / "overrides.json").read_text())
    viewers = overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert viewers["markdown"] == viewers["myst"] == "Jupytext Notebook"
    assert overrides["@jupyterlab/apputils-extension:themes"] == {"theme": "JupyterLab Dark"}, (
        "postBuild must keep the settings it found")


def test_postbuild_in_a_clone_deletes_nothing_and_the_scan_sees_the_solutions(clone_run):
    out = _ok(clone_run)
    repo = clone_run["repo"]
    assert "Not a Binder (repo2docker) build: nothing removed" in out, out
    for nb in exercise_notebooks():
        kept = repo / "notebooks" / nb.name
        assert kept.read_bytes() == nb.read_bytes(), f"notebooks/{nb.name} was changed"
        assert (repo / "book" / "exercises" / f"{nb.stem}.md").is_file()
        assert (repo / "exercises" / nb.name).is_file()
    assert (repo / "_build" / "course" / "gradebook.db").is_file()
    # The same scan as on Binder finds the solutions and hidden tests here: it can fail.
    found = "\n".join(leaks([repo], clone_run["secrets"]))
    for nb in exercise_notebooks():
        for holder in (f"notebooks/{nb.name}", f"book/exercises/{nb.stem}.md",
                       f"_build/course/source/{nb.stem}/{nb.name}"):
            assert f"repo/{holder}: " in found, f"the scan misses {holder}:\n{found}"
    assert "repo/exercises/" not in found, found


# postBuild's binder_build function alone, evaluated in bash.
GUARD = ('eval "$(sed -n "/^binder_build() {/,/^}/p" postBuild)"; '
         'binder_build && echo yes || echo no')


@pytest.mark.parametrize(("variables", "where", "expected"), [
    ({}, "repo", "no"),
    ({"REPO_DIR": "{repo}"}, "repo", "no"),
    ({"NB_USER": "jovyan"}, "repo", "no"),
    ({"REPO_DIR": "{repo}", "NB_USER": "jovyan"}, "elsewhere", "no"),
    ({"REPO_DIR": "{tmp}/missing", "NB_USER": "jovyan"}, "repo", "no"),
    ({"REPO_DIR": "{repo}", "NB_USER": "jovyan"}, "repo", "yes"),
    ({"REPO_DIR": "{tmp}/link", "NB_USER": "jovyan"}, "repo", "yes"),
])
def test_binder_guard_needs_repo_dir_nb_user_and_the_repository_as_cwd(tmp_path, variables,
                                                                         where, expected):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "postBuild", repo / "postBuild")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(repo)
    env = {k: v for k, v in os.environ.items() if k not in ("REPO_DIR", "NB_USER")}
    env.update({k: v.format(repo=repo, tmp=tmp_path) for k, v in variables.items()})
    cwd = repo if where == "repo" else tmp_path / "elsewhere"
    script = GUARD.replace("postBuild", str(repo / "postBuild"))
    proc = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == expected, proc.stdout + proc.stderr


def test_dockerignore_keeps_git_history_out_of_the_binder_image(tmp_path):
    build = pytest.importorskip("docker.utils.build", reason="docker-py comes with repo2docker")
    repo = _scratch_repository(tmp_path / "repo")
    (repo / ".git" / "objects").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    patterns = [ln.strip() for ln in (repo / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    context = build.exclude_paths(str(repo), patterns)
    assert not [p for p in context if p == ".git" or p.startswith(".git/")], "no .git on Binder"
    for needed in ("postBuild", "requirements.txt", "pyproject.toml", "runtime.txt",
                   "notebooks/floats.ipynb", "nbgrader/nbgrader_config.py",
                   "qcourse/grading/__init__.py"):
        assert needed in context, f"{needed} must reach the Binder build"


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

    # postBuild as repo2docker runs it (from REPO_DIR, NB_USER set), with qcourse really
    # installed: it must release the exercises and leave no solution behind.
    secrets = distinctive_secrets(src)
    (tmp_path / "tmp").mkdir()
    build_env = dict(env, REPO_DIR=str(src), NB_USER="jovyan", TMPDIR=str(tmp_path / "tmp"),
                     QCOURSE_LAB_SETTINGS_DIR=str(tmp_path / "lab-settings"))
    proc = subprocess.run(["bash", "./postBuild"], cwd=src, env=build_env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"postBuild:\n{proc.stdout[-3000:]}{proc.stderr[-4000:]}"
    assert not (src / "notebooks").exists() and not (src / "book" / "exercises").exists()
    assert sorted(p.stem for p in (src / "exercises").glob("*.ipynb")) == sorted(
        p.stem for p in exercise_notebooks())
    found = leaks([src, tmp_path / "tmp"], secrets)
    assert not found, "solutions or hidden tests left:\n" + "\n".join(found)

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
