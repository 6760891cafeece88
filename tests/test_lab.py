"""The learner's view: a chapter and an exercise notebook run in JupyterLab, in headless Chromium.

A scratch directory is prepared the way Binder prepares the repository: ``postBuild`` runs there,
which releases the student version of the exercises into ``exercises/`` and tells JupyterLab to
open Markdown files as notebooks through Jupytext. A chapter (``book/floats.md``, copied) and
the student notebook ``exercises/floats.ipynb`` are then opened in JupyterLab, served on
127.0.0.1 by the ``jupyter-lab`` process itself (so that its PID is the server's, and the test
stops it by that PID). The browser may not reach any other host.

In the chapter: every cell runs, and the bit explorer widget answers a change of its value and a
click on a bit. In the exercise notebook: the learner writes the answer to the first exercise,
runs every cell, and sees the public checks pass; the next, unanswered exercise stops the run
with ``NotImplementedError``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from browser_support import ROOT, guarded_page, screenshot_path

from qcourse.floats import FORMATS, encode
from qcourse.grading import PUBLIC_PASS_MESSAGE

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CHAPTER = "floats"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - 127.0.0.1
        return response.read()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A learner's copy of the course, prepared by postBuild as on Binder."""
    if not (ROOT / "notebooks" / f"{CHAPTER}.ipynb").is_file():
        pytest.skip(f"no notebooks/{CHAPTER}.ipynb")
    root = tmp_path_factory.mktemp("learner")
    (root / "book").mkdir()
    shutil.copy(ROOT / "book" / f"{CHAPTER}.md", root / "book")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               QCOURSE_LAB_SETTINGS_DIR=str(root / ".lab-settings"))
    proc = subprocess.run(["bash", str(ROOT / "postBuild")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"postBuild failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert (root / "exercises" / f"{CHAPTER}.ipynb").is_file()
    return root


@pytest.fixture(scope="module")
def lab(workspace, tmp_path_factory):
    """JupyterLab on 127.0.0.1, started as the jupyter-lab process itself; stopped by its PID."""
    exe = BIN / "jupyter-lab"
    if not exe.is_file():
        pytest.skip("jupyter-lab is not installed next to this Python (requirements.txt has it)")
    home = tmp_path_factory.mktemp("lab_home")
    user_settings = home / "user-settings" / "@jupyterlab" / "notebook-extension"
    user_settings.mkdir(parents=True)
    # Render every cell (no windowing), so that the page holds all outputs at once.
    (user_settings / "tracker.jupyterlab-settings").write_text(
        json.dumps({"windowingMode": "none"}))
    # Do not ask about the news feed (its toast would cover the notebook).
    apputils = home / "user-settings" / "@jupyterlab" / "apputils-extension"
    apputils.mkdir(parents=True)
    (apputils / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    port, token = _free_port(), "qcourse-test-token"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JUPYTER", "MPLBACKEND", "PYTEST", "COV_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(home / "user-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"),
        IPYTHONDIR=str(home / "ipython"),
    )
    cmd = [str(exe), "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={workspace}",
           f"--LabApp.app_settings_dir={workspace / '.lab-settings'}",
           "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False",
           # No news feed and no update check: the server would fetch them from the internet.
           "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI and the course machines run as root
    log = (home / "lab.log").open("w")
    proc = subprocess.Popen(cmd, cwd=workspace, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter-lab exited ({proc.returncode}):\n"
                            f"{(home / 'lab.log').read_text()[-4000:]}")
            try:
                _get(f"{base}api/status?token={token}")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("jupyter-lab did not answer within 90 s:\n"
                                f"{(home / 'lab.log').read_text()[-4000:]}")
                time.sleep(0.5)
        yield {"base": base, "token": token, "root": workspace, "pid": proc.pid}
    finally:
        if proc.poll() is None:
            for kernel in _kernels(base, token):
                req = urllib.request.Request(f"{base}api/kernels/{kernel['id']}?token={token}",
                                             method="DELETE")
                try:
                    urllib.request.urlopen(req, timeout=10).close()  # noqa: S310 - 127.0.0.1
                except OSError:
                    pass
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def _kernels(base: str, token: str) -> list[dict]:
    try:
        return json.loads(_get(f"{base}api/kernels?token={token}"))
    except OSError:
        return []


@pytest.fixture
def page(browser):
    with guarded_page(browser, 1400, 1000, 60_000) as page:
        yield page


# JavaScript run in the page, through the JupyterLab application object (exposed with
# --LabApp.expose_app_in_browser) for what the DOM cannot tell reliably.
PANEL = """
  const panelFor = (path) => {
    const app = window.jupyterapp;
    if (!app) { return null; }
    for (const w of app.shell.widgets("main")) {
      if (w.context && w.context.path === path && w.content && w.sessionContext) { return w; }
    }
    return null;
  };
"""

NOTEBOOK_READY = """
(path) => {""" + PANEL + """
  const panel = panelFor(path);
  if (!panel || !panel.sessionContext.isReady) { return false; }
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return !!kernel && kernel.status === "idle" && panel.content.widgets.length > 0;
}
"""

CELLS = """
(path) => {""" + PANEL + """
  const panel = panelFor(path);
  const kernel = panel.sessionContext.session.kernel;
  return {
    path: panel.context.path,
    factory: panel.context.factoryName || "",
    kernel: kernel.status,
    cells: panel.content.widgets.map((cell) => {
      const m = cell.model;
      const nbgrader = (m.getMetadata && m.getMetadata("nbgrader")) || {};
      const out = m.type === "code" ? m.outputs.toJSON() : [];
      return {type: m.type, id: nbgrader.grade_id || "", count: m.type === "code" ?
              m.executionCount : null, source: m.sharedModel.getSource(), outputs: out};
    }),
  };
}
"""

ALL_DONE = """
(path) => {""" + PANEL + """
  const panel = panelFor(path);
  const kernel = panel.sessionContext.session.kernel;
  const busy = panel.content.widgets.some((c) => c.model.type === "code" &&
      c.node.querySelector(".jp-InputPrompt") &&
      c.node.querySelector(".jp-InputPrompt").textContent.includes("*"));
  return kernel.status === "idle" && !busy;
}
"""


def _open(page, lab, path: str) -> dict:
    # A workspace of its own for each notebook: nothing is restored from an earlier test.
    workspace = "w" + "".join(ch if ch.isalnum() else "-" for ch in path)
    page.goto(f"{lab['base']}lab/workspaces/{workspace}/tree/{path}?token={lab['token']}",
              wait_until="load")
    page.wait_for_function(NOTEBOOK_READY, arg=path, timeout=120_000, polling=500)
    return page.evaluate(CELLS, path)


def _run_all(page, path: str) -> dict:
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_timeout(500)
    page.wait_for_function(ALL_DONE, arg=path, timeout=300_000, polling=500)
    return page.evaluate(CELLS, path)


def _errors(cells: list[dict]) -> list[str]:
    return [f"{o.get('ename')}: {o.get('evalue')}" for c in cells for o in c["outputs"]
            if o.get("output_type") == "error"]


def _text(cell: dict) -> str:
    parts = []
    for o in cell["outputs"]:
        if o.get("output_type") == "stream":
            parts.append(o["text"] if isinstance(o["text"], str) else "".join(o["text"]))
        elif "data" in o and "text/plain" in o["data"]:
            t = o["data"]["text/plain"]
            parts.append(t if isinstance(t, str) else "".join(t))
    return "".join(parts)


def test_chapter_runs_and_the_bit_explorer_answers(lab, page):
    path = f"book/{CHAPTER}.md"
    state = _open(page, lab, path)
    assert sum(c["type"] == "code" for c in state["cells"]) > 5, (
        "the chapter did not open as a notebook (Jupytext, set up by postBuild): "
        f"{len(state['cells'])} cells")
    state = _run_all(page, path)
    code = [c for c in state["cells"] if c["type"] == "code"]
    assert not _errors(code), f"cells raised: {_errors(code)}"
    assert all(c["count"] for c in code), "not every code cell ran"

    # The bit explorer: a live widget, driven as a reader would.
    widget = page.locator(".jp-OutputArea-output .jupyter-widgets.widget-vbox").first
    widget.scroll_into_view_if_needed()
    fmt_name = widget.locator("select").input_value()
    fmt = FORMATS[fmt_name]
    value_box = widget.locator("input[type=text]")

    def bits_shown() -> str:
        return "".join(widget.locator(".widget-toggle-button").all_inner_texts())

    new_value = 1.5 if float(value_box.input_value()) != 1.5 else 2.75
    bits = int(encode(new_value, fmt))
    value_box.fill(str(new_value))
    value_box.press("Enter")
    expected = format(bits, f"0{fmt.total_bits}b")
    page.wait_for_function(
        "([sel, want]) => Array.from(document.querySelectorAll(sel)).map((b) => b.textContent)"
        ".join('') === want",
        arg=[".jp-OutputArea-output .jupyter-widgets.widget-vbox .widget-toggle-button",
             expected], timeout=30_000)
    # the buttons and the description below them are separate widget messages: wait for both
    page.wait_for_function(
        "([sel, want]) => document.querySelector(sel).innerText.includes(want)",
        arg=[".jp-OutputArea-output .jupyter-widgets.widget-vbox", f"0x{bits:X}"],
        timeout=30_000)
    assert f"0x{bits:X}" in widget.inner_text(), f"{new_value} in {fmt_name} is 0x{bits:X}"

    # Click the sign bit: the value box follows.
    widget.locator(".widget-toggle-button").first.click()
    page.wait_for_function("(want) => document.querySelector("
                           "'.jp-OutputArea-output .widget-vbox input[type=text]').value === want",
                           arg=repr(-new_value), timeout=30_000)
    assert bits_shown()[0] == "1"
    widget.screenshot(path=screenshot_path("lab_bit_explorer"))
    page.screenshot(path=screenshot_path("lab_chapter"))
    assert not page.guard.blocked, f"requests off 127.0.0.1: {page.guard.blocked}"


def _solution_body(stem: str, grade_id: str) -> str:
    nb = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())
    for cell in nb["cells"]:
        if cell["metadata"].get("nbgrader", {}).get("grade_id") == grade_id:
            source = "".join(cell["source"])
            lines = [ln for ln in source.splitlines()
                     if ln.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION")]
            return "\n".join(lines)
    raise AssertionError(f"no cell {grade_id} in notebooks/{stem}.ipynb")


def test_exercise_notebook_gives_the_learner_feedback(lab, page):
    path = f"exercises/{CHAPTER}.ipynb"
    state = _open(page, lab, path)
    ids = [c["id"] for c in state["cells"]]
    first = f"{CHAPTER}_ex1_solution"
    assert first in ids, f"no {first} in the student notebook: {ids}"
    blank = state["cells"][ids.index(first)]["source"]
    assert "raise NotImplementedError()" in blank, "the released solution cell is not blank"

    # The learner types the answer to exercise 1 into its cell.
    answer = _solution_body(CHAPTER, first)
    cell = page.locator(".jp-Notebook .jp-Cell").nth(ids.index(first))
    cell.locator(".cm-content").click()
    page.keyboard.press("Control+a")
    page.keyboard.insert_text(answer)
    page.keyboard.press("Escape")
    typed = page.evaluate(CELLS, path)["cells"][ids.index(first)]["source"]
    assert typed.strip() == answer.strip(), "the editor did not take the answer as typed"

    state = _run_all(page, path)
    cells = state["cells"]
    tests = cells[ids.index(f"{CHAPTER}_ex1_tests")]
    assert not [o for o in tests["outputs"] if o.get("output_type") == "error"], tests["outputs"]
    assert PUBLIC_PASS_MESSAGE in _text(tests), f"no pass message: {tests['outputs']}"
    errors = _errors(cells)
    assert errors and errors[0].startswith("NotImplementedError"), (
        f"the unanswered exercise 2 should stop the run with NotImplementedError: {errors}")
    page.locator(".jp-Notebook .jp-Cell").nth(ids.index(f"{CHAPTER}_ex1_tests")) \
        .scroll_into_view_if_needed()
    page.screenshot(path=screenshot_path("lab_exercise"))
    assert not page.guard.blocked, f"requests off 127.0.0.1: {page.guard.blocked}"
