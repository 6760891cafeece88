"""Every sentence that says a chapter matches an outside system stands next to the check.

A chapter that writes "bit for bit with ONNX Runtime" (or "matches ml_dtypes", "identical to
PyTorch's ...") must show it: a code cell in the same section (or anywhere on the page, for the
chapter's opening, which announces what follows) that runs the oracle and prints its version
with the comparison. PyTorch is not in the book's environment, so a sentence about PyTorch must
also be conditional: glued from the cell that knows whether it ran, or worded "where installed".
TFLite's runtime is LiteRT (``ai-edge-litert``): a sentence about TFLite/LiteRT needs a cell in
its section that runs LiteRT (the page printing ``ai_edge_litert.__version__``), or must sit in a
section that says LiteRT does not run there and names what stands in for it.
A sentence that says where the comparison lives instead (``tests/test_STEM.py``, the test
suite, another chapter) needs no cell here, but about PyTorch it too must be conditional. The
Exercises section describes tasks and is not scanned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from notebook_runner import chapters

CLAIM = re.compile(
    r"bit[ -]for[ -]bit|bit[- ]exact|\bmatch(es|ed|ing)?\b|\bagree(s|d)? with\b|\bidentical\b"
    r"|\b(checks?|checked|tested|compared?)\b[^.]*\bagainst\b"
    r"|same (bit patterns|bytes|integers|codes|outputs|result)", re.IGNORECASE)
ORACLES = {  # name in prose -> evidence that a cell ran it and printed its version
    "ml_dtypes": re.compile(r"ml_dtypes\.__version__"),
    "ONNX Runtime": re.compile(r"\b(ort|onnxruntime)\.__version__"),
    "PyTorch": re.compile(r"\btorch\.__version__"),
}
PROSE_NAMES = {"ml_dtypes": r"ml_dtypes", "ONNX Runtime": r"ONNX Runtime|onnxruntime",
               "PyTorch": r"PyTorch|\btorch\b", "TFLite": r"TFLite|TensorFlow Lite|LiteRT"}
CONDITIONAL = re.compile(r"\{glue:text\}|\b(where|when|if)\b[^.;]{0,40}\b(installed|available)\b",
                         re.IGNORECASE)
LITERT_RUNS = re.compile(r"\brun_tflite\(|\bai_edge_litert\b")
LITERT_VERSION = re.compile(r"\bai_edge_litert\.__version__")
TFLITE_ABSENT = re.compile(r"no (TFLite|LiteRT)[^.]*(runs|is installed|package)", re.IGNORECASE)
CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
FENCE = re.compile(r"^(```|:::)[^\n]*\n.*?^\1\s*$", re.MULTILINE | re.DOTALL)


@dataclass
class Section:
    title: str
    prose: str
    code: str


def sections(text: str) -> list[Section]:
    """The page cut at its ``##`` headings: prose (no code, no fenced blocks) and code."""
    text = re.sub(r"\A---\n.*?\n---\n", "", text, flags=re.DOTALL)
    out = []
    for i, chunk in enumerate(re.split(r"^(?=## )", text, flags=re.MULTILINE)):
        title = chunk.splitlines()[0] if i else "(opening)"
        code = "\n".join(CELL.findall(chunk))
        prose = FENCE.sub(" ", chunk)
        out.append(Section(title, prose, code))
    return out


def sentences(prose: str) -> list[str]:
    out = []
    for paragraph in re.split(r"\n\s*\n", prose):
        flat = " ".join(paragraph.split())
        out += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z(*])", flat) if s]
    return out


def unbacked_claims(text: str) -> list[str]:
    """The claims in one chapter's source that have no check (see the module docstring)."""
    parts = sections(text)
    page_code = "\n".join(p.code for p in parts)
    problems = []
    for i, part in enumerate(parts):
        if part.title.startswith("## Exercises"):  # describes the tasks, claims nothing
            continue
        for sentence in sentences(part.prose):
            if not CLAIM.search(sentence):
                continue
            for oracle, name in PROSE_NAMES.items():
                if not re.search(name, sentence):
                    continue
                # the opening announces the page; "below" points further down the page
                where = (page_code if i == 0 else
                         "\n".join(p.code for p in parts[i:]) if "below" in sentence
                         else part.code)
                about_tests = re.search(r"tests/test_|\bthe tests\b|test suite|the \w+ chapter",
                                        sentence)
                short = sentence[:140]
                if oracle == "TFLite":
                    if LITERT_RUNS.search(where) and LITERT_VERSION.search(page_code):
                        continue  # LiteRT, TFLite's runtime, runs in the section
                    if not TFLITE_ABSENT.search(part.prose if i else text):
                        problems.append(f"[{part.title}] TFLite claim in a section that does not "
                                        f"say TFLite does not run here: {short!r}")
                    continue
                if about_tests and (oracle != "PyTorch" or CONDITIONAL.search(sentence)):
                    continue  # where the test lives (said conditionally for the optional one)
                if not ORACLES[oracle].search(where):
                    problems.append(f"[{part.title}] {oracle} claim with no cell that runs it and "
                                    f"prints its version: {short!r}")
                if oracle == "PyTorch" and not CONDITIONAL.search(sentence):
                    problems.append(f"[{part.title}] PyTorch is not in the book's environment; "
                                    f"say it conditionally (glue, or 'where installed'): {short!r}")
    return problems


@pytest.mark.parametrize("chapter", chapters(), ids=lambda p: p.stem)
def test_every_claim_about_an_outside_system_has_its_check_on_the_page(chapter: Path):
    problems = unbacked_claims(chapter.read_text())
    assert not problems, "\n".join(problems)


BROKEN = """---
jupytext: {}
---
# A chapter

We match ONNX Runtime bit for bit.

## Where it is shown

The codes are identical to PyTorch's.

```{code-cell} ipython3
import onnxruntime as ort
print(ort.__version__)
```

## Elsewhere

The layer matches ml_dtypes bit for bit, and TFLite's reference too.
"""


def test_the_scan_catches_claims_without_checks():
    problems = "\n".join(unbacked_claims(BROKEN))
    assert "[(opening)] ONNX Runtime claim" not in problems  # a check exists on the page
    assert "[## Where it is shown] PyTorch claim with no cell" in problems
    assert "[## Where it is shown] PyTorch is not in the book's environment" in problems
    assert "[## Elsewhere] ml_dtypes claim with no cell" in problems
    assert "[## Elsewhere] TFLite claim in a section that does not say" in problems
    fixed = BROKEN.replace("The codes are identical to PyTorch's.",
                           "Where installed, the codes are identical to PyTorch's.")
    fixed = fixed.replace("import onnxruntime as ort",
                          "import onnxruntime as ort\nimport torch\nprint(torch.__version__)")
    assert "PyTorch" not in "\n".join(unbacked_claims(fixed))


def test_a_tflite_claim_passes_only_where_litert_runs_in_its_section():
    runs = BROKEN + ("\n```{code-cell} ipython3\nimport ai_edge_litert\n"
                     "print(ai_edge_litert.__version__)\ngot = deploy.run_tflite(model, x)\n```\n")
    assert "TFLite claim" not in "\n".join(unbacked_claims(runs))
    no_version = runs.replace("print(ai_edge_litert.__version__)", "")
    assert "[## Elsewhere] TFLite claim" in "\n".join(unbacked_claims(no_version))
    elsewhere = runs.replace("\n```{code-cell} ipython3\nimport ai_edge_litert",
                             "\n## Later\n\n```{code-cell} ipython3\nimport ai_edge_litert")
    assert "[## Elsewhere] TFLite claim" in "\n".join(unbacked_claims(elsewhere))
