"""JupyterHub for one qcourse class on one machine, with nbgrader's exchange.

Run it as root from the repository (the Hub starts each user's server as that local user):

    make hub                      # configurable-http-proxy (npm) and a Python users can run
    mkdir -m 0777 -p /srv/nbgrader/exchange
    QCOURSE_INSTRUCTORS=alice QCOURSE_ROSTER=roster.csv \\
        .venv/bin/jupyterhub -f nbgrader/hub/jupyterhub_config.py

Who may log in: the instructors (``QCOURSE_INSTRUCTORS``, comma-separated) and every student of
the roster CSV (``QCOURSE_ROSTER``, the same file ``qcourse-course roster`` imports), each a
local account. Log-in is the machine's own (PAM) unless the command line names another
authenticator (``tests/test_hub.py`` passes ``--JupyterHub.authenticator_class=dummy``).

Each server is JupyterLab with nbgrader's extensions, configured by role: the folder
``nbgrader/hub/student`` or ``nbgrader/hub/instructor`` is put on the server's
``JUPYTER_CONFIG_PATH``, after ``nbgrader/hub/common`` (no news feed, no update check: the
servers make no request off the machine). Students get the assignment list (fetch, submit,
fetch feedback) and no formgrader; instructors get the formgrader, over the course directory
``~/qcourse`` (``qcourse-course release --course ~/qcourse``). Both use the exchange
``QCOURSE_EXCHANGE``
(default ``/srv/nbgrader/exchange``, mode 0777 as nbgrader's documentation asks). The Hub's own
state (its database, cookie secret, the proxy's PID file) goes to ``QCOURSE_HUB_STATE``
(default ``/srv/qcourse-hub``).
"""

import csv
import os
import sys
from pathlib import Path

c = get_config()  # noqa: F821 - provided by JupyterHub when it loads this file

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VENV = Path(os.environ.get("QCOURSE_VENV", REPO / ".venv"))
USER_PYTHON = VENV / "hub" / "python" / "bin" / "python"  # made by `make hub`
PROXY = VENV / "hub" / "proxy" / "node_modules" / ".bin" / "configurable-http-proxy"
EXCHANGE = os.environ.get("QCOURSE_EXCHANGE", "/srv/nbgrader/exchange")
STATE = Path(os.environ.get("QCOURSE_HUB_STATE", "/srv/qcourse-hub"))

for needed in (USER_PYTHON, PROXY):
    if not needed.exists():
        sys.exit(f"{needed} is missing: run `make hub` first")

INSTRUCTORS = {n for n in os.environ.get("QCOURSE_INSTRUCTORS", "").split(",") if n}


def roster_ids(path):
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return {row["id"].strip() for row in csv.DictReader(fh) if row.get("id", "").strip()}


STUDENTS = roster_ids(os.environ["QCOURSE_ROSTER"]) if os.environ.get("QCOURSE_ROSTER") else set()

# The Hub and its proxy listen on this machine only; a reverse proxy with TLS goes in front.
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.hub_ip = "127.0.0.1"
c.ConfigurableHTTPProxy.command = [str(PROXY)]
STATE.mkdir(parents=True, exist_ok=True, mode=0o700)
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(STATE / "jupyterhub-proxy.pid")
c.JupyterHub.cleanup_servers = True  # stopping the Hub stops every user's server

c.Authenticator.allowed_users = INSTRUCTORS | STUDENTS

# Each user's server: JupyterLab, started as that local user in their home folder.
c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cmd = [str(USER_PYTHON), "-m", "jupyterhub.singleuser"]
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180
c.Spawner.mem_limit = "2G"  # advertised to the server; enforced on Kubernetes (z2jh-values.yaml)


def configure_by_role(spawner):
    """Students and instructors get different nbgrader extensions (see the folders)."""
    role = "instructor" if spawner.user.name in INSTRUCTORS else "student"
    spawner.environment.update({
        "JUPYTER_CONFIG_PATH": f"{HERE / role}:{HERE / 'common'}",
        "QCOURSE_EXCHANGE": EXCHANGE,
        "PATH": f"{USER_PYTHON.parent}:/usr/local/bin:/usr/bin:/bin",
        "MPLBACKEND": "Agg",
    })


c.Spawner.pre_spawn_hook = configure_by_role
