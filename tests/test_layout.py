"""The repository keeps its shape: one stem per concept, a narrow public API, layers that import
downwards, one home for each shared piece, modules and functions a reader can take in, lint-clean
code."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

import qcourse

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "qcourse"
# Modules that serve several chapters rather than being one chapter's library.
SHARED_MODULES = {"__init__", "datasets", "nn", "bench", "grading"}
# Chapter modules the package exports as modules, not name by name.


# Pages of the book that are not chapters with a module and exercises.
NON_CHAPTER_PAGES = {"intro", "references", "grading"}


def chapter_stems() -> list[str]:
    # book/*.md only: the self-study pages in book/exercises/ are not chapters (see below).
    return sorted(p.stem for p in (ROOT / "book").glob("*.md") if p.stem not in NON_CHAPTER_PAGES)


def _top_level_modules() -> list[str]:
    """qcourse's public modules and subpackages by name (a package is a folder with __init__.py;
    a name starting with ``_`` is private plumbing, not a module of its own)."""
    files = [p.stem for p in LIBRARY.glob("*.py")
             if p.stem == "__init__" or not p.stem.startswith("_")]
    packages = [p.parent.name for p in LIBRARY.glob("*/__init__.py")]
    return files + packages


def library_modules() -> list[str]:
    return sorted(s for s in _top_level_modules() if s not in SHARED_MODULES)


def shared_modules() -> list[str]:
    return sorted(s for s in _top_level_modules() if s in SHARED_MODULES and s != "__init__")


def all_module_names() -> list[str]:
    """Every importable module of the library, subpackage files included (``qcourse.nn.core``)."""
    names = []
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if (len(parts) > 1 and parts[1] == "data") or parts[-1] == "__main__":
            continue  # shipped data; ``python -m`` entry points (running them is the CLI)
        names.append(".".join(parts))
    return names


@pytest.mark.parametrize("stem", chapter_stems())
def test_each_chapter_has_module_tests_and_exercises(stem):
    module = LIBRARY / f"{stem}.py"
    package = LIBRARY / stem / "__init__.py"
    assert module.is_file() or package.is_file(), f"book/{stem}.md has no qcourse/{stem}(.py)"
    for path in (f"tests/test_{stem}.py", f"notebooks/{stem}.ipynb"):
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
    assert (ROOT / test_file).is_file(), f"qcourse/{stem} has no {test_file}"


# --------------------------------------------------------------------------- the public API

#: At most this many names in ``qcourse.__all__``: the modules and the core every chapter uses.
MAX_TOP_LEVEL = 40


# The grading package is the instructor's tool, not a chapter's library: its public names are
# its package's __all__; its files (the parts of one command) are checked by test_grading.
# Private modules (``_checks``, ``_deprecated``) serve the others and export nothing.
@pytest.mark.parametrize("name", [n for n in all_module_names()
                                  if n != "qcourse" and not n.startswith("qcourse.grading.")
                                  and not n.rpartition(".")[2].startswith("_")])
def test_module_declares_all(name):
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    assert len(module.__all__) == len(set(module.__all__)), f"{name}.__all__ repeats a name"
    for entry in module.__all__:
        assert hasattr(module, entry), f"{name}.__all__ names a missing {entry}"


def test_the_package_exports_its_modules_and_a_small_core():
    exported = qcourse.__all__
    assert len(exported) <= MAX_TOP_LEVEL, (
        f"qcourse.__all__ has {len(exported)} names (at most {MAX_TOP_LEVEL}): reach the rest "
        f"as qcourse.MODULE.name")
    assert len(exported) == len(set(exported))
    for stem in library_modules() + ["nn", "datasets"]:
        assert stem in exported, f"qcourse.__all__ does not list the module {stem}"
    for name in exported:
        obj = getattr(qcourse, name)
        if isinstance(obj, types.ModuleType):
            assert obj.__name__ == f"qcourse.{name}"
            continue
        home = importlib.import_module(".".join(obj.__module__.split(".")[:2]))
        assert name in home.__all__ and getattr(home, name) is obj, (
            f"qcourse.{name} is not {home.__name__}.{name}")


def test_a_former_top_level_name_still_resolves_with_a_warning():
    with pytest.warns(DeprecationWarning, match=r"qcourse\.kernels\.matmul_int8_bt"):
        assert qcourse.matmul_int8_bt is qcourse.kernels.matmul_int8_bt
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        qcourse.no_such_name  # noqa: B018
    from qcourse import grading  # a submodule still imports through the package

    assert grading.__name__ == "qcourse.grading"


def _moved_tables() -> list[tuple[str, str, str]]:
    """``(module, old name, new home)`` of every name kept for one release (``_deprecated``)."""
    rows = []
    for name in all_module_names():
        hook = getattr(importlib.import_module(name), "__getattr__", None)
        for old, target in getattr(hook, "moved", {}).items():
            rows.append((name, old, target))
    return rows


@pytest.mark.parametrize("module_name, old, target", _moved_tables())
def test_a_renamed_name_warns_and_gives_the_new_object(module_name, old, target):
    module = importlib.import_module(module_name)
    assert old not in module.__all__ and old not in vars(module), (
        f"{module_name}.{old} is still defined or imported there, so the warning never fires")
    home, _, new = target.rpartition(".")
    with pytest.warns(DeprecationWarning, match=target.replace(".", r"\.")):
        got = getattr(module, old)
    assert got is getattr(importlib.import_module(home), new)


def test_the_renames_that_chapters_taught_are_the_ones_kept():
    kept = {(m, old) for m, old, _ in _moved_tables()}
    assert ("qcourse.qat", "lsq_scale_grad") in kept and ("qcourse.nn", "MLP") in kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DeprecationWarning):
            from qcourse.qat import lsq_scale_grad  # noqa: F401


def _code_cells(path: Path) -> list[str]:
    """The Python code of a chapter (MyST code cells) or an exercise notebook (code cells)."""
    text = path.read_text()
    if path.suffix == ".ipynb":
        cells = [c for c in json.loads(text)["cells"] if c["cell_type"] == "code"]
        return ["".join(c["source"]) for c in cells]
    return re.findall(r"^```\{code-cell\}[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def stale_imports(code: str) -> list[str]:
    """Names ``code`` reaches through an old home: a former top-level name (``qcourse.X`` or
    ``from qcourse import X`` outside ``qcourse.__all__``) or a renamed or moved name that a
    module keeps for one release (``from qcourse.M import old``, ``qcourse.M.old``)."""
    if code.startswith("---\n"):                  # a cell's YAML options block
        code = code.split("\n---\n", 1)[1]
    source = "\n".join(line for line in code.splitlines()  # options and IPython magics
                       if not line.startswith(("%", "!", ":")))
    moved = {(m, old) for m, old, _ in _moved_tables()}
    found = []

    def check(module: str, name: str) -> None:
        if module == "qcourse":
            if not (name in qcourse.__all__ or name.startswith("_")
                    or importlib.util.find_spec(f"qcourse.{name}") is not None):
                found.append(f"qcourse.{name} (not in qcourse.__all__)")
        elif (module, name) in moved:
            found.append(f"{module}.{name} (renamed or moved)")

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qcourse"):
            for alias in node.names:
                check(node.module, alias.name)
        elif isinstance(node, ast.Attribute):
            parts, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                parts.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id == "qcourse":
                dotted = ["qcourse", *reversed(parts)]
                check(".".join(dotted[:-1]), dotted[-1])
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "book").glob("*.md"))
                         + sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_chapters_and_exercises_import_from_where_things_live(path):
    stale = [f"{name}" for code in _code_cells(path) for name in stale_imports(code)]
    assert not stale, f"{path.name} reaches names through an old home: {stale}"


def test_the_import_check_finds_an_old_home():
    code = ("import qcourse\nfrom qcourse import QParams, matmul_int8_bt\n"
            "from qcourse.qat import lsq_scale_grad\nqcourse.kernels.matmul_int8_packed(a, b)\n"
            "qcourse.kernels.matmul_int8(a, b)\nqcourse.floats.encode(1.0, 'fp16')\n")
    assert stale_imports(code) == [
        "qcourse.matmul_int8_bt (not in qcourse.__all__)",
        "qcourse.qat.lsq_scale_grad (renamed or moved)",
        "qcourse.kernels.matmul_int8_packed (renamed or moved)",
    ]


# --------------------------------------------------------------------------- layers

#: DESIGN.md's layers, from the ground up: numbers -> integer arithmetic -> models -> tools.  A
#: module imports only from its own layer or below (``qcourse._deprecated`` resolves the old
#: names of a higher layer lazily, by string, and is not an import).
LAYERS = {
    "_deprecated": 0, "_checks": 0, "datasets": 0,
    "floats": 1, "fixed_point": 1, "affine": 1, "calibration": 1,
    "kernels": 2, "_kernels": 2, "int_matmul": 2, "conv": 2,
    "nn": 3, "ptq": 3, "qat": 3, "mixed_precision": 3, "lowbit": 3, "transformer": 3,
    "kv_cache": 3, "weight_only": 3, "cnn": 3, "_cnn_qat": 3,  # cnn's QAT, in its own file
    "grading": 4, "bench": 4, "deploy": 4,
    "data": 4,  # qcourse/data/make_*.py: the scripts that make the shipped weights (tools)
}


def _imports(path: Path) -> set[str]:
    """The qcourse top-level modules that ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qcourse"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("qcourse."))
    return found


def test_each_module_imports_only_its_layer_or_below():
    wrong = []
    for path in sorted(LIBRARY.rglob("*.py")):
        rel = path.relative_to(LIBRARY)
        if rel.name == "__init__.py" and rel.parent == Path("."):
            continue  # the package itself gathers everything
        stem = rel.parts[0].removesuffix(".py")
        assert stem in LAYERS, f"qcourse/{rel}: give its module a layer in LAYERS"
        for dep in _imports(path) - {stem}:
            if dep in LAYERS and LAYERS[dep] > LAYERS[stem]:
                wrong.append(f"qcourse/{rel} (layer {LAYERS[stem]}) imports qcourse.{dep} "
                             f"(layer {LAYERS[dep]})")
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------- one home each

#: Shared pieces and the one file that defines them.  Defining one of these names anywhere else
#: in the library (as a function, a method, a class or a module-level name) writes it a second
#: time.  ``None``: a name that was merged away and must not come back.
ONE_HOME = {
    "copy_model": "nn/tools.py", "swapped_weights": "nn/tools.py", "predict": "nn/tools.py",
    "accuracy": "nn/tools.py", "evaluate": "nn/tools.py", "feed_activations": "nn/tools.py",
    "capture_activations": "nn/tools.py", "calibrate": "nn/tools.py",
    "linear_layers": "nn/tools.py", "layer_info": "nn/tools.py",
    "quantize_weight": "affine/quantizer.py", "with_float32_scale": "affine/quantizer.py",
    # fixed_point's rescalings share their rounding shifts, argument checks and int32 guards
    "_half_step": "fixed_point.py", "_rdbpot": "fixed_point.py",
    "_rdbpot_half_up": "fixed_point.py", "_pot_args": "fixed_point.py",
    "_multiplier_args": "fixed_point.py", "_fits_int32": "fixed_point.py",
    "_shift_left_in_int32": "fixed_point.py", "_raw_operands": "fixed_point.py",
    # the layout of quantization parameters, per-group ranges, and scales as a file stores them
    "_check_layout": "affine/quantizer.py", "_group_minmax": "affine/quantizer.py",
    "_stored_scale": "affine/quantizer.py",
    "_zero_point_args": "int_matmul/arithmetic.py",
    # the names the copies had before they were merged
    "_clone": None, "_f32_qparams": None, "_float32_qparams": None, "evaluate_model": None,
    "MLP": None, "matmul_int8_packed": None,
}

#: The same for the tests and the book's build tools (paths from the repository root): headless
#: Chromium fenced to 127.0.0.1, and the MyST pages the notebook tests write.
ONE_HOME_TOOLS = {
    "CHROMIUM_ARGS": "book/_ext/qcourse_chromium.py", "SETTLE": "book/_ext/qcourse_chromium.py",
    "chromium_executable": "book/_ext/qcourse_chromium.py",
    "launch": "book/_ext/qcourse_chromium.py", "is_local": "book/_ext/qcourse_chromium.py",
    "fenced_route": "book/_ext/qcourse_chromium.py",
    "open_settled": "book/_ext/qcourse_chromium.py",
    "StaticServer": "book/_ext/qcourse_chromium.py",
    "_QuietHandler": "book/_ext/qcourse_chromium.py",
    "MYST_HEADER": "tests/notebook_runner.py", "code_cell": "tests/notebook_runner.py",
    "myst_page": "tests/notebook_runner.py",
    # the names the copies had before they were merged
    "HEADER": None, "cell": None, "chromium": None, "_Quiet": None, "_route": None,
}

#: Where each shared piece is used: every function named here must use the helper (call it or
#: name it), so writing the shared lines out again in one of them fails this test.
SHARED_BY = {
    "_rdbpot": ["fixed_point.py:rounding_divide_by_pot",
                "fixed_point.py:multiply_by_quantized_multiplier"],
    "_rdbpot_half_up": ["fixed_point.py:rounding_divide_by_pot_half_up",
                        "fixed_point.py:multiply_by_quantized_multiplier_half_up"],
    "_half_step": ["fixed_point.py:_rdbpot", "fixed_point.py:_rdbpot_half_up"],
    "_pot_args": ["fixed_point.py:rounding_divide_by_pot",
                  "fixed_point.py:rounding_divide_by_pot_half_up"],
    "_multiplier_args": ["fixed_point.py:multiply_by_quantized_multiplier",
                         "fixed_point.py:multiply_by_quantized_multiplier_half_up"],
    "_shift_left_in_int32": ["fixed_point.py:multiply_by_quantized_multiplier",
                             "fixed_point.py:multiply_by_quantized_multiplier_half_up"],
    "_fits_int32": ["fixed_point.py:_shift_left_in_int32",
                    "fixed_point.py:multiply_by_quantized_multiplier"],
    "_raw_operands": ["fixed_point.py:fixed_add", "fixed_point.py:fixed_mul"],
    "_check_layout": ["affine/quantizer.py:QParams.__post_init__",
                      "affine/quantizer.py:qparams_from_range"],
    "_zero_point_args": ["int_matmul/arithmetic.py:zero_point_terms",
                     "int_matmul/arithmetic.py:fold_zero_points"],
    "_group_minmax": ["affine/quantizer.py:choose_qparams", "weight_only.py:_group_ranges"],
    "_stored_scale": ["lowbit.py:quantize_int4_groupwise", "weight_only.py:_group_params"],
    "fenced_route": ["../tests/browser_support.py:Guard.attach",
                     "../book/_ext/qcourse_pdf.py:fenced_page"],
    "StaticServer": ["../book/_ext/qcourse_pdf.py:build_pdf"],
    "SETTLE": ["../book/_ext/qcourse_chromium.py:open_settled"],
    "open_settled": ["../tests/reader_view.py:read_page", "../book/_ext/qcourse_pdf.py:build_pdf",
                     "../tests/test_browser.py:open_page", "../tests/test_reader_view.py:visited"],
    "launch": ["../tests/browser_support.py:chromium_browser",
               "../book/_ext/qcourse_pdf.py:build_pdf"],
    "myst_page": ["../tests/test_chapters.py:_myst", "../tests/test_book_execution.py:small_book"],
    "code_cell": ["../tests/test_chapters.py:_myst"],
}


def _definitions(root: Path, folders: list[Path]) -> list[tuple[str, str]]:
    """(name, file relative to ``root``) for every function, method and class, and every
    module-level assignment, in the ``.py`` files under ``folders``."""
    out = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            tree = ast.parse(path.read_text())
            rel = path.relative_to(root).as_posix()
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    out.append((node.name, rel))
            for node in tree.body:
                targets = (node.targets if isinstance(node, ast.Assign)
                           else [node.target] if isinstance(node, ast.AnnAssign) else [])
                out.extend((t.id, rel) for t in targets if isinstance(t, ast.Name))
    return out


def misplaced(definitions: list[tuple[str, str]], homes: dict[str, str | None],
              prefix: str = "") -> list[str]:
    return [f"{name} is defined in {prefix}{where}"
            + (f", its home is {prefix}{homes[name]}" if homes[name] else
               " (merged away: use the one home)")
            for name, where in definitions if name in homes and where != homes[name]]


def test_each_shared_piece_is_defined_once_in_its_home():
    library = _definitions(LIBRARY, [LIBRARY])
    tools = _definitions(ROOT, [ROOT / "tests", ROOT / "book" / "_ext"])
    problems = misplaced(library, ONE_HOME, "qcourse/") + misplaced(tools, ONE_HOME_TOOLS)
    homes = {**{k: f"qcourse/{v}" for k, v in ONE_HOME.items() if v}, **ONE_HOME_TOOLS}
    defined = {(n, f"qcourse/{w}") for n, w in library} | set(tools)
    problems += [f"{name} is not defined in its home {home}" for name, home in homes.items()
                 if home and (name, home) not in defined]
    assert not problems, "\n".join(problems)


def _function(tree: ast.AST, qualname: str) -> ast.AST | None:
    """The function (or method, ``Class.method``) ``qualname`` at the top of ``tree``."""
    node = tree
    for part in qualname.split("."):
        node = next((n for n in getattr(node, "body", [])
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return None
    return node


def unshared(root: Path, shared_by: dict[str, list[str]]) -> list[str]:
    """The places of ``shared_by`` (``file:function``, files relative to ``root``) that do not
    use their shared piece: no call of it and no mention of its name in the function."""
    problems = []
    for helper, places in shared_by.items():
        for place in places:
            rel, qualname = place.split(":")
            path = (root / rel).resolve()
            func = _function(ast.parse(path.read_text()), qualname)
            if func is None:
                problems.append(f"{place}: no such function (update SHARED_BY)")
                continue
            names = {n.id for n in ast.walk(func) if isinstance(n, ast.Name)}
            names |= {n.attr for n in ast.walk(func) if isinstance(n, ast.Attribute)}
            if helper not in names:
                problems.append(f"{place} does not use {helper}: the shared piece is written "
                                f"out again there")
    return problems


def test_each_shared_piece_is_used_where_it_was_written_twice():
    problems = unshared(LIBRARY, SHARED_BY)
    assert not problems, "\n".join(problems)


def test_the_one_home_checks_find_a_copy(tmp_path):
    """Both checks can fail: a second definition, and a function that writes the lines out."""
    (tmp_path / "home.py").write_text("def _shared(x):\n    return x + 1\n")
    (tmp_path / "user.py").write_text(
        "from home import _shared\n\n\ndef good(x):\n    return _shared(x) * 2\n\n\n"
        "def copied(x):\n    return (x + 1) * 2\n\n\n"
        "def _shared(x):\n    return x + 1\n")
    definitions = _definitions(tmp_path, [tmp_path])
    assert misplaced(definitions, {"_shared": "home.py"}) == [
        "_shared is defined in user.py, its home is home.py"]
    assert unshared(tmp_path, {"_shared": ["user.py:good", "user.py:copied"]}) == [
        "user.py:copied does not use _shared: the shared piece is written out again there"]


#: Blocks of six or more lines that stand twice in qcourse/ on purpose, or for now, with why.
#: A pair is named by its two files (the same file twice for a repeat inside one file).
REPEATS_ALLOWED = {
    # Deliberate teaching steps: the kernels chapter shows each rung of the kernel ladder whole.
    ("_kernels.pyx", "_kernels.pyx"): "the kernel ladder's rungs, shown one by one in the book",
}

MIN_REPEAT_LINES = 6


def _code_lines_of(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that carry code: not blank, not a comment, not
    a docstring, not an import, not lone punctuation (the way ``duplicates`` reads code)."""
    text = path.read_text()
    lines = text.splitlines()
    skip = set()
    if path.suffix == ".py":
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):  # the names of a long import
                skip.update(range(node.lineno, node.end_lineno + 1))
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)) and node.body:
                first = node.body[0]
                if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                        and isinstance(first.value.value, str)):
                    skip.update(range(first.lineno, first.end_lineno + 1))
    out = []
    for i, line in enumerate(lines, 1):
        t = " ".join(line.split())
        if (i in skip or not t or t.startswith("#") or re.fullmatch(r"[\W_]{1,4}", t)
                or re.match(r"(from \S+ )?c?import\b", t)):
            continue
        out.append((i, t))
    return out


def repeated_blocks(root: Path, allowed=None, under: tuple[str, ...] = (".",)) -> list[str]:
    """Runs of ``MIN_REPEAT_LINES`` or more code lines that stand twice in the ``.py`` and
    ``.pyx`` files below ``root``'s folders ``under``, letter for letter once white space is
    folded: one line per pair of files, ``a.py:10 ~ b.py:40`` (paths from ``root``), except the
    pairs in ``allowed``."""
    allowed = allowed or {}
    seen: dict[tuple[str, ...], tuple[str, int]] = {}
    found: dict[tuple[str, str], str] = {}
    files = sorted(p for folder in under for pattern in ("*.py", "*.pyx")
                   for p in (root / folder).rglob(pattern))
    for path in files:
        rel = path.relative_to(root).as_posix()
        code = _code_lines_of(path)
        for k in range(len(code) - MIN_REPEAT_LINES + 1):
            window = tuple(t for _, t in code[k:k + MIN_REPEAT_LINES])
            start = code[k][0]
            if window not in seen:
                seen[window] = (rel, start)
                continue
            other, other_start = seen[window]
            if other == rel and start - other_start < MIN_REPEAT_LINES:
                continue  # a run that overlaps itself (a repeated line)
            pair = (other, rel)
            if pair in allowed or pair[::-1] in allowed or pair in found:
                continue
            found[pair] = f"{other}:{other_start} ~ {rel}:{start}"
    return sorted(found.values())


def test_no_block_of_six_lines_is_written_twice_in_the_library():
    repeats = repeated_blocks(LIBRARY, REPEATS_ALLOWED)
    assert not repeats, ("the same lines stand twice (give them one home, or list the pair in "
                         "REPEATS_ALLOWED with the reason):\n" + "\n".join(repeats))


def test_no_block_of_six_lines_is_written_twice_in_the_tests_and_the_book_tools():
    repeats = repeated_blocks(ROOT, under=("tests", "book/_ext"))
    assert not repeats, "the same lines stand twice:\n" + "\n".join(repeats)


def test_the_repeat_check_finds_a_copied_block(tmp_path):
    block = "".join(f"    y{i} = x * {i} + 1\n" for i in range(MIN_REPEAT_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "a.py").write_text(f'def f(x):\n    """Doc."""\n{block}    return y0\n')
    (tmp_path / "pkg" / "b.py").write_text(
        f"import os\n\n\ndef g(x):\n    # a comment is no code\n{block}    return y1\n")
    short = block.split("\n", 1)[1]  # one line fewer: not a repeat
    (tmp_path / "c.py").write_text(f"def h(x):\n{short}    return y2\n")
    assert repeated_blocks(tmp_path) == ["a.py:3 ~ pkg/b.py:6"]
    assert repeated_blocks(tmp_path, {("a.py", "pkg/b.py"): "on purpose"}) == []


# --------------------------------------------------------------------------- the size budget

MAX_MODULE_LINES = 1000
MAX_FUNCTION_CODE_LINES = 80
LONG_NOTE = "# long because:"
#: Over the budget by name, each with the reason.
EXEMPT = {
}


def _code_lines(node: ast.AST, lines: list[str]) -> int:
    """Lines of a function's body that hold code: not blank, not a comment, not the docstring
    (the signature does not count either)."""
    body = node.body
    if (len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        body = body[1:]
    return sum(1 for i in range(body[0].lineno, node.end_lineno + 1)
               if lines[i - 1].strip() and not lines[i - 1].strip().startswith("#"))


def size_offenders(root: Path) -> list[str]:
    """Modules over ``MAX_MODULE_LINES`` lines and functions over ``MAX_FUNCTION_CODE_LINES``
    code lines with no ``# long because:`` note (on the line above the ``def`` or inside it),
    by name, for every ``.py`` file under ``root``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in EXEMPT:
            continue
        source = path.read_text()
        lines = source.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            found.append(f"{rel}: {len(lines)} lines (budget {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            n = _code_lines(node, lines)
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            span = lines[max(first - 2, 0): node.end_lineno]
            if n > MAX_FUNCTION_CODE_LINES and not any(LONG_NOTE in line for line in span):
                found.append(f"{rel}: {node.name} has {n} code lines (budget "
                             f"{MAX_FUNCTION_CODE_LINES}; or say why with '{LONG_NOTE}')")
    return found


def test_modules_and_functions_keep_to_the_size_budget():
    offenders = size_offenders(LIBRARY)
    assert not offenders, "over the size budget:\n" + "\n".join(offenders)


def test_the_size_budget_finds_a_long_module_and_a_long_function(tmp_path):
    (tmp_path / "fine.py").write_text("x = 1\n" * MAX_MODULE_LINES)
    (tmp_path / "big.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    body = "".join(f"    y{i} = {i}\n" for i in range(MAX_FUNCTION_CODE_LINES + 1))
    docstring = '    """A docstring and comments do not count."""\n    # a comment\n'
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "funcs.py").write_text(
        "def long_one():\n" + docstring + body + "\n\n"
        "def just_right():\n" + docstring + body.split("\n", 1)[1] + "\n\n"
        "# long because: a table of cases reads best in one piece\n"
        "def explained():\n" + body + "\n\n"
        "class Holder:\n    def long_method(self):\n" + body.replace("    ", "        "))
    assert size_offenders(tmp_path) == [
        f"big.py: {MAX_MODULE_LINES + 1} lines (budget {MAX_MODULE_LINES})",
        f"pkg/funcs.py: long_one has {MAX_FUNCTION_CODE_LINES + 1} code lines (budget "
        f"{MAX_FUNCTION_CODE_LINES}; or say why with '{LONG_NOTE}')",
        f"pkg/funcs.py: long_method has {MAX_FUNCTION_CODE_LINES + 1} code lines (budget "
        f"{MAX_FUNCTION_CODE_LINES}; or say why with '{LONG_NOTE}')",
    ]


# --------------------------------------------------------------------------- tests and tools


def test_hypothesis_settings_live_in_conftest():
    """One profile (tests/conftest.py); a test file sets only what differs (max_examples)."""
    from hypothesis import settings

    assert settings.default.deadline is None
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        assert not re.search(r"settings\([^)]*deadline", path.read_text()), (
            f"{path.name} sets a Hypothesis deadline")


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


def test_the_run_order_names_files_that_exist():
    """conftest.py orders the test files for ``make test`` (the book build first, the files that
    read the built book after the heaviest others); a renamed or removed file must not drop
    silently out of it."""
    from conftest import BOOK_READERS, FIRST_FILES, file_rank

    tests = Path(__file__).resolve().parent
    missing = [name for name in (*FIRST_FILES, *BOOK_READERS) if not (tests / name).is_file()]
    assert not missing, f"conftest.py orders test files that do not exist: {missing}"
    assert (file_rank("test_book.py") < file_rank("test_reader_view.py")
            < file_rank("test_affine.py"))
