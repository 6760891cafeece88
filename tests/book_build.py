"""Build the HTML book once for every test file that needs it, and again only when it changes.

``built_book_html()`` runs ``jupyter-book build -W -n --keep-going`` into
``_build/test-book/KEY/``, where KEY hashes everything the book is made from: the configuration,
the chapters and their assets, the library (sources and compiled kernels), the pinned
requirements and the Python and Jupyter Book versions. Test files that run in different pytest-xdist
workers share the build through a file lock: the first one builds, the others wait and reuse it.
A build that fails is not kept, so the next run builds again.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "_build" / "test-book"
JB = Path(sys.executable).with_name("jupyter-book")
SOURCES = ["_config.yml", "_toc.yml", "requirements.txt", "pyproject.toml", "book/**/*",
           "qcourse/**/*.py", "qcourse/**/*.pyx", "qcourse/**/*.h", "qcourse/**/*.so",
           "qcourse/data/*"]


def toc_entries(toc: dict | None = None) -> list[str]:
    """Every page of ``_toc.yml`` in reading order: the root, each chapter, then its sections."""
    if toc is None:
        import yaml

        toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            files.append(entry["file"])
            walk(entry.get("sections", []))

    for part in toc.get("parts", []):
        walk(part["chapters"])
    walk(toc.get("chapters", []))
    return files


def source_key() -> str:
    digest = hashlib.sha256()
    digest.update(sys.version.encode())
    digest.update(metadata.version("jupyter-book").encode())
    files = sorted({p for pattern in SOURCES for p in ROOT.glob(pattern)
                    if p.is_file() and "__pycache__" not in p.parts
                    and ".ipynb_checkpoints" not in p.parts})
    for path in files:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no other worker to wait for
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def built_book_html(timeout: int = 1800) -> Path:
    """The built book's ``_build/html``; raises AssertionError with the log if the build fails."""
    key = source_key()
    out = CACHE / key
    html = out / "_build" / "html"
    with _locked(CACHE / ".lock"):
        if (out / "BUILD-OK").is_file() and (html / "index.html").is_file():
            return html
        for old in CACHE.iterdir():
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        cmd = [str(JB), "build", str(ROOT), "-W", "-n", "--keep-going", "--path-output",
               str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if proc.returncode != 0 or not (html / "index.html").is_file():
            shutil.rmtree(out, ignore_errors=True)
            raise AssertionError(
                f"book build failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}")
        # The build's own log stays beside it: MyST-NB prints each page's execution time there.
        (out / "build.log").write_text(proc.stdout + proc.stderr)
        (out / "BUILD-OK").write_text(key + "\n")
    return html
