"""Make a Python that every local account can run, with this environment's packages.

A Hub starts each user's server as that user, so the users need a Python interpreter they can
execute and read. The course's environment (``.venv``) may be built on an interpreter that
other accounts cannot reach (on the course machines it lives in root's home, mode 0700). This
script makes ``DEST``, a virtual environment on this interpreter where others can already run
it, or else on a copy of its installation in ``DEST-base`` (a system Python of the same minor
version is not enough: Debian's 3.11.2 mis-parses the possessive quantifiers of soupsieve's
CSS grammar, which nbgrader's feedback uses), whose
``site-packages`` points at this environment's (a ``.pth`` file) and whose ``share/`` and
``etc/`` are this environment's (JupyterLab's assets, the server extensions' switches).
``make hub`` runs it; ``nbgrader/hub/jupyterhub_config.py`` starts user servers with it. Where the
environment itself sits in a folder other accounts cannot search, no Python is made: the reason
goes to ``unavailable.txt`` next to ``DEST`` (and the Hub test skips with it).

    python nbgrader/hub/user_python.py DEST
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

UNAVAILABLE = "unavailable.txt"  # next to DEST: why no Python was made (tests/test_hub.py reads it)


def reachable_by_others(path: Path) -> bool:
    """True when an account other than the owner can run ``path`` (every folder above it
    searchable by others, the file executable by others)."""
    path = path.resolve()
    for folder in path.parents:
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IXOTH)


def base_interpreter(spare: Path) -> Path:
    """This very interpreter (same micro version: the packages' compiled regular expressions and
    extensions were made for it), where other accounts can run it; else a copy in ``spare``."""
    if reachable_by_others(Path(sys._base_executable)):
        return Path(sys._base_executable).resolve()
    return copy_interpreter(spare)


def copy_interpreter(dest: Path) -> Path:
    """Copy this Python's own installation (interpreter, shared library, standard library; no
    site-packages or tests) to ``dest``; returns the interpreter. A shared ``libpython`` found
    through an absolute RUNPATH is looked for next to the copy instead (``$ORIGIN/../lib``,
    written over the old path, which is longer)."""
    base = Path(sys.base_prefix).resolve()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "bin").mkdir(parents=True)
    shutil.copytree(base / "lib" / version, dest / "lib" / version, symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages", "test", "__pycache__",
                                                  "idlelib", "turtledemo"))
    (dest / "lib" / version / "site-packages").mkdir()
    for lib in (base / "lib").glob("libpython*.so*"):
        shutil.copy2(lib, dest / "lib" / lib.name, follow_symlinks=False)
    binary = Path(sys._base_executable).resolve()
    code = binary.read_bytes()
    old, new = str(base / "lib").encode(), b"$ORIGIN/../lib"
    if old in code and len(new) <= len(old):
        code = code.replace(old + b"\0", new + b"\0" * (len(old) - len(new) + 1))
    interpreter = dest / "bin" / version
    interpreter.write_bytes(code)
    interpreter.chmod(0o755)
    for folder in [dest, *dest.rglob("*")]:
        if folder.is_dir():
            folder.chmod(0o755)
    return interpreter


def check_as_another_user(python: Path) -> None:
    """As root, run ``python`` as ``nobody``: the accounts must be able to start it."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return
    check = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(python), "-c",
         "import jupyterhub, jupyterlab, nbgrader, qcourse, soupsieve; "
         "soupsieve.compile('img:not([alt])')"],
        capture_output=True, text=True, cwd="/")
    if check.returncode != 0:
        raise SystemExit(f"{python} does not run for other accounts:\n{check.stderr[-2000:]}")


def copy_scripts(dest: Path) -> None:
    """This environment's console scripts (``alembic``, which nbgrader runs by name,
    ``nbgrader``, ``jupyter``...), each starting ``DEST``'s Python instead."""
    ours = {f"#!{Path(sys.executable).absolute()}", f"#!{Path(sys.executable).resolve()}"}
    for script in sorted((Path(sys.prefix) / "bin").iterdir()):
        target = dest / "bin" / script.name
        if target.exists() or not script.is_file():
            continue
        with contextlib.suppress(UnicodeDecodeError, OSError):
            first, _, rest = script.read_text().partition("\n")
            if first.strip() in ours:
                target.write_text(f"#!{dest / 'bin' / 'python'}\n{rest}")
                target.chmod(0o755)


def unreachable_packages() -> str | None:
    """Why the accounts could not import this environment's packages (None when they can):
    its ``site-packages`` and the course's ``qcourse`` must be in folders others can search."""
    import qcourse

    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    for folder in (purelib, Path(qcourse.__file__).resolve().parent):
        if not reachable_by_others(folder):
            return (f"{folder} is in a folder other accounts cannot search, so the Hub's "
                    "users could not import the course's packages; to run the Hub, put the "
                    "checkout where other accounts can read it (e.g. under /srv or /opt)")
    return None


def make(dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    unavailable = dest.parent / UNAVAILABLE
    unavailable.unlink(missing_ok=True)
    why = unreachable_packages()
    if why:  # not a failure of the Hub: this checkout's place; tests/test_hub.py skips, saying so
        unavailable.write_text(why + "\n")
        print(f"no Python for the Hub's accounts: {why}")
        return
    interpreter = base_interpreter(dest.parent / f"{dest.name}-base")
    subprocess.run([str(interpreter), "-m", "venv", "--without-pip", str(dest)], check=True)
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (dest / "lib" / version / "site-packages" / "qcourse-environment.pth").write_text(
        f"import site; site.addsitedir({str(purelib)!r})\n")
    for name in ("share", "etc"):
        if (Path(sys.prefix) / name).is_dir():
            (dest / name).symlink_to(Path(sys.prefix).resolve() / name)
    copy_scripts(dest)
    check = subprocess.run(
        [str(dest / "bin" / "python"), "-c",
         "import jupyterhub, jupyterlab, nbgrader, qcourse; print(qcourse.__file__)"],
        capture_output=True, text=True)
    try:
        if check.returncode != 0:
            raise SystemExit(f"{dest} cannot import the course's packages:\n{check.stderr}")
        check_as_another_user(dest / "bin" / "python")
    except SystemExit:
        shutil.rmtree(dest)  # no half-made Python: tests/test_hub.py skips without one
        raise
    print(f"{dest}/bin/python: {interpreter} with the packages of {purelib}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    make(Path(sys.argv[1]).absolute())
