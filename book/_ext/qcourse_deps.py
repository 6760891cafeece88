"""No stale page: a chapter is read (and so executed) again when a library module it uses changes.

Sphinx re-reads a page when its own source or a file it literal-includes changes. A chapter that
*imports* ``qcourse.nn`` does neither when ``qcourse/nn/core.py`` changes, so an incremental
``make book`` would keep the numbers that the old code printed. This extension records, when a
page is read, the content hash of every module file its code cells import, directly or through
the library's own imports (the compiled kernels' shared object included), and at the next build
(``env-get-outdated``) marks the page outdated when any of those files changed, appeared or
disappeared. With ``execute_notebooks: force`` (``_config.yml``) a page that is read again is
executed again.

The imports are found by reading code, not by running it: ``ast`` over each code cell of the
page and over each module of the tracked packages (``qcourse_tracked_packages`` in the Sphinx
configuration, default ``["qcourse"]``); importing a submodule also runs its packages'
``__init__.py``, so those count too.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import importlib.util
import re
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

_CODE_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
_IMPORT_LINE = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import\s+([\w ,()]+)|import\s+([\w., ]+))",
                          re.MULTILINE)


def _package_root(package: str) -> Path | None:
    """The folder of a top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def module_file(dotted: str, roots: dict[str, Path]) -> Path | None:
    """The file of module ``dotted`` in one of the tracked packages, or None."""
    top, *rest = dotted.split(".")
    if top not in roots:
        return None
    base = roots[top].joinpath(*rest)
    if base.is_dir() and (base / "__init__.py").is_file():
        return base / "__init__.py"
    for suffix in (".py", *importlib.machinery.EXTENSION_SUFFIXES):
        candidate = base.with_name(base.name + suffix) if rest else None
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _imported_names(code: str, package: str | None = None) -> set[str]:
    """Dotted names that ``code`` imports: modules, and ``module.attribute`` candidates."""
    names: set[str] = set()
    try:
        tree = ast.parse(code)
    except SyntaxError:  # IPython magics and the like: fall back to the import lines
        for src, what, plain in _IMPORT_LINE.findall(code):
            if plain:
                names.update(n.split(" as ")[0].strip() for n in plain.split(","))
            else:
                names.add(src)
                names.update(f"{src}.{n.split(' as ')[0].strip()}"
                             for n in what.strip("() ").split(",") if n.strip())
        return names
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level and package:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                source = ".".join(base + ([source] if source else []))
            if not source:
                continue
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def dependencies(code: str, roots: dict[str, Path]) -> set[Path]:
    """Every tracked module file that running ``code`` imports, with the packages' inits."""
    found: set[Path] = set()
    todo = [(name, None) for name in _imported_names(code)]
    seen: set[str] = set()
    while todo:
        name, _ = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
            dotted = ".".join(parts[:i])
            path = module_file(dotted, roots)
            if path is None or path in found:
                continue
            found.add(path)
            if path.suffix == ".py":
                package = dotted if path.name == "__init__.py" else ".".join(parts[: i - 1])
                todo += [(n, None) for n in _imported_names(path.read_text(), package)]
    return found


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _roots(app: Sphinx) -> dict[str, Path]:
    roots = {}
    for package in app.config.qcourse_tracked_packages:
        root = _package_root(package)
        if root is not None:
            roots[package] = root
    return roots


def _record(app: Sphinx, docname: str, source: list[str]) -> None:
    code = "\n".join(block for block in _CODE_CELL.findall(source[0]))
    files = dependencies(code, _roots(app)) if code else set()
    if not hasattr(app.env, "qcourse_module_hashes"):
        app.env.qcourse_module_hashes = {}
    app.env.qcourse_module_hashes[docname] = {str(p): _digest(p) for p in sorted(files)}


def stale_documents(recorded: dict[str, dict[str, str | None]]) -> dict[str, list[str]]:
    """Pages whose recorded module files changed since they were read: page -> changed files."""
    stale = {}
    for docname, hashes in recorded.items():
        changed = [path for path, digest in hashes.items() if _digest(Path(path)) != digest]
        if changed:
            stale[docname] = changed
    return stale


def _outdated(app: Sphinx, env: Any, added: set, changed: set, removed: set) -> list[str]:
    recorded = {d: h for d, h in getattr(env, "qcourse_module_hashes", {}).items()
                if d in env.found_docs and d not in removed}
    stale = stale_documents(recorded)
    for docname, files in sorted(stale.items()):
        logger.info(f"[qcourse_deps] {docname}: re-executed, the library changed "
                    f"({', '.join(Path(f).name for f in files)})")
    return sorted(stale)


def _purge(app: Sphinx, env: Any, docname: str) -> None:
    getattr(env, "qcourse_module_hashes", {}).pop(docname, None)


def _merge(app: Sphinx, env: Any, docnames: set, other: Any) -> None:
    if not hasattr(env, "qcourse_module_hashes"):
        env.qcourse_module_hashes = {}
    for docname in docnames:
        if docname in getattr(other, "qcourse_module_hashes", {}):
            env.qcourse_module_hashes[docname] = other.qcourse_module_hashes[docname]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("qcourse_tracked_packages", ["qcourse"], "env")
    app.connect("source-read", _record)
    app.connect("env-get-outdated", _outdated)
    app.connect("env-purge-doc", _purge)
    app.connect("env-merge-info", _merge)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}
