"""nbgrader operations (generate_assignment, generate_feedback) in a fresh process.

nbgrader's API keeps state per process (its config, logging, a database engine); each batch of
operations runs in its own ``python -m qcourse.grading _nbgrader-batch`` rooted at the course
directory, and reports each operation's success as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .course import GradingError
from .processes import python_env


def run_batch(course: Path, ops: list[list[str]], overrides: dict | None = None) -> list[dict]:
    """Run nbgrader operations through its Python API in a fresh process rooted at ``course``."""
    job = {"course": str(course), "ops": ops, "overrides": overrides or {}}
    proc = subprocess.run(
        [sys.executable, "-m", "qcourse.grading", "_nbgrader-batch"],
        input=json.dumps(job), capture_output=True, text=True, env=python_env(), timeout=3600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise GradingError(f"nbgrader failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    results = json.loads(lines[-1])["results"]
    for op, result in zip(ops, results, strict=True):
        if not result["success"]:
            raise GradingError(f"nbgrader {' '.join(op)} failed:\n{result.get('error', '')[-4000:]}"
                               f"\n{result.get('log', '')[-2000:]}")
    return results


def batch_main() -> None:
    """Run nbgrader operations (JSON job on stdin) through its API; print results as JSON."""
    import warnings

    warnings.simplefilter("ignore")
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    job = json.loads(sys.stdin.read())
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    course = Path(job["course"])
    os.chdir(course)
    cfg = PyFileConfigLoader("nbgrader_config.py", path=str(course)).load_config()
    cfg.CourseDirectory.root = str(course)
    cfg.merge(Config(job.get("overrides", {})))
    api = NbGraderAPI(coursedir=CourseDirectory(config=cfg), config=cfg)
    results = []
    for op, *args in job["ops"]:
        if op == "generate_assignment":
            r = api.generate_assignment(args[0], force=True, create=True)
        elif op == "generate_feedback":
            r = api.generate_feedback(args[0], force=True)
        else:
            r = {"success": False, "error": f"unknown operation {op}"}
        results.append({k: r.get(k) for k in ("success", "error", "log")})
    out.write(json.dumps({"results": results}) + "\n")
    out.flush()
