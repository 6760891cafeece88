"""Make a Python that every local account can run, with this environment's packages.

A Hub starts each user's server as that user, so the users need a Python interpreter they can
execute and read. The course's environment (``.venv``) may be built on an interpreter that
other accounts cannot reach (on the course machines it lives in root's home, mode 0700). This
script makes ``DEST``, a virtual environment on a system interpreter of the same version
(``/usr/bin/python3.X``, or this one where others can already run it), whose
``site-packages`` points at this environment's (a ``.pth`` file) and whose ``share/`` and
``etc/`` are this environment's (JupyterLab's assets, the server extensions' switches).
``make hub`` runs it; ``nbgrader/hub/jupyterhub_config.py`` starts user servers with it.

    python nbgrader/hub/user_python.py DEST
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path


def reachable_by_others(path: Path) -> bool:
    """True when an account other than the owner can run ``path`` (every folder above it
    searchable by others, the file executable by others)."""
    path = path.resolve()
    for folder in path.parents:
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IXOTH)


def base_interpreter() -> Path:
    """An interpreter of this Python's version that other accounts can run."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [Path(sys._base_executable), Path("/usr/bin") / version,
                  Path("/usr/local/bin") / version]
    for candidate in candidates:
        if candidate.is_file() and reachable_by_others(candidate):
            return candidate.resolve()
    raise SystemExit(f"no {version} that other accounts can run (tried "
                     f"{', '.join(map(str, candidates))}); install Debian's {version}")


def make(dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run([str(base_interpreter()), "-m", "venv", "--without-pip", str(dest)],
                   check=True)
    purelib = Path(sysconfig.get_paths()["purelib"]).resolve()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (dest / "lib" / version / "site-packages" / "qcourse-environment.pth").write_text(
        f"import site; site.addsitedir({str(purelib)!r})\n")
    for name in ("share", "etc"):
        if (Path(sys.prefix) / name).is_dir():
            (dest / name).symlink_to(Path(sys.prefix).resolve() / name)
    check = subprocess.run(
        [str(dest / "bin" / "python"), "-c",
         "import jupyterhub, jupyterlab, nbgrader, qcourse; print(qcourse.__file__)"],
        capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"{dest} cannot import the course's packages:\n{check.stderr}")
    print(f"{dest}/bin/python: {base_interpreter()} with the packages of {purelib}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    make(Path(sys.argv[1]).absolute())
