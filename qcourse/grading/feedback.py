"""What students see: outputs kept short, and feedback without the hidden tests.

``SanitizeFeedback`` is the nbgrader preprocessor that the course config
(``nbgrader/nbgrader_config.py``) puts into ``nbgrader generate_feedback``; it is built on
first use (``qcourse.grading.SanitizeFeedback``) so that importing this package does not import
nbgrader. ``generate_feedback`` runs nbgrader's feedback for the graded assignments.
"""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path
from typing import Any

from .batch import run_batch
from .notebook import HIDDEN_BEGIN, HIDDEN_END, cell_source, is_test

_MAX_OUTPUT_CHARS = 20_000
_MAX_OUTPUTS_PER_CELL = 30


def truncate_outputs(nb: dict) -> None:
    """Keep outputs readable: at most a few dozen per cell, each at most ~20k characters."""
    for cell in nb.get("cells", []):
        outputs = cell.get("outputs")
        if not isinstance(outputs, list):
            continue
        if len(outputs) > _MAX_OUTPUTS_PER_CELL:
            kept = outputs[:_MAX_OUTPUTS_PER_CELL]
            kept.append({"output_type": "stream", "name": "stdout",
                         "text": f"... {len(outputs) - len(kept)} more outputs removed ...\n"})
            cell["outputs"] = outputs = kept
        for out in outputs:
            if out.get("output_type") == "stream":
                text = cell_source({"source": out.get("text", "")})
                if len(text) > _MAX_OUTPUT_CHARS:
                    out["text"] = (text[:_MAX_OUTPUT_CHARS] + f"\n... output truncated "
                                   f"({len(text):,} characters) ...\n")
            elif out.get("output_type") in ("display_data", "execute_result"):
                data = out.get("data", {})
                size = len(json.dumps(data))
                if size > 20 * _MAX_OUTPUT_CHARS:
                    out["data"] = {"text/plain": f"[output removed: {size:,} bytes]"}
            elif out.get("output_type") == "error":
                tb = out.get("traceback", [])
                if len(tb) > 60:
                    out["traceback"] = tb[:30] + ["... traceback truncated ..."] + tb[-29:]
                out["traceback"] = [line[:_MAX_OUTPUT_CHARS] for line in out["traceback"]]


def sanitize_feedback_class() -> type:
    from nbgrader.preprocessors import NbGraderPreprocessor

    class SanitizeFeedback(NbGraderPreprocessor):
        """Feedback preprocessor: remove hidden tests and their tracebacks from graded cells.

        A graded cell keeps its public checks and a note where the hidden tests ran; an error in
        it is shown as ``ExceptionName: message`` only, since a traceback would quote the hidden
        test that raised it.
        """

        def preprocess_cell(self, cell: Any, resources: Any, index: int) -> tuple:
            if is_test(cell):
                src = cell.source
                if HIDDEN_BEGIN in src:
                    lines, depth, out = src.splitlines(), 0, []
                    for line in lines:
                        if HIDDEN_BEGIN in line:
                            if depth == 0:
                                out.append("# (hidden tests ran here; they are not shown)")
                            depth += 1
                        elif HIDDEN_END in line:
                            depth = max(depth - 1, 0)
                        elif not depth:
                            out.append(line)
                    cell.source = "\n".join(out)
                for output in cell.get("outputs", []):
                    if output.get("output_type") == "error":
                        output["traceback"] = [f"{output.get('ename')}: {output.get('evalue')}"]
            return cell, resources

    return SanitizeFeedback


def generate_feedback(course: Path, stems: list[str], jobs: int) -> None:
    """``nbgrader generate_feedback`` for ``stems``, in up to ``jobs`` processes at once."""
    if not stems:
        return
    groups = [stems[k::max(1, jobs)] for k in range(max(1, jobs))]
    with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
        runs = [pool.submit(run_batch, course, [["generate_feedback", s] for s in g])
                for g in groups if g]
        for run in runs:
            run.result()
