"""Test helpers for the course's JupyterHub (tests/test_hub.py): local accounts, the Hub, users.

``LocalAccounts`` creates real local accounts (``useradd``, as root) with homes in a scratch
folder and removes them afterwards; nbgrader takes a student's id from the account their server
runs as. ``Hub`` starts ``jupyterhub`` with the repository's ``nbgrader/hub/jupyterhub_config.py``
on free ports of 127.0.0.1, and stops it, and everything it started, by PID. ``HubUser`` logs
in with a password, starts the user's server and talks to it with a token, as a script or the
JupyterLab front end would.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
HUB_CONFIG = ROOT / "nbgrader" / "hub" / "jupyterhub_config.py"
VENV = Path(sys.prefix)
USER_PYTHON = VENV / "hub" / "python" / "bin" / "python"
PROXY = VENV / "hub" / "proxy" / "node_modules" / ".bin" / "configurable-http-proxy"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_of(uids: set[int]) -> list[int]:
    """PIDs of the processes whose real user id is in ``uids``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, StopIteration):
                status = Path(f"/proc/{entry}/status").read_text()
                uid = int(next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1])
                if uid in uids:
                    found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class LocalAccounts:
    """Local accounts ``PREFIX + role`` with homes under ``base`` (removed by ``remove``)."""

    def __init__(self, base: Path, roles: list[str]) -> None:
        self.prefix = "qc" + secrets.token_hex(3)  # unique: the machine is shared
        self.base = base
        self.names: dict[str, str] = {}
        self.uids: set[int] = set()
        (base / "home").mkdir(mode=0o755)
        for role in roles:
            name = self.prefix + role
            home = base / "home" / name
            subprocess.run(["useradd", "--create-home", "--home-dir", str(home), "--shell",
                            "/bin/bash", "--user-group", name], check=True,
                           capture_output=True, text=True)
            self.names[role] = name
            self.uids.add(pwd.getpwnam(name).pw_uid)

    def home(self, role: str) -> Path:
        return Path(pwd.getpwnam(self.names[role]).pw_dir)

    def run(self, role: str, argv: list[str], cwd: Path | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        """Run ``argv`` as the account of ``role``, in its home (as a terminal would)."""
        account = pwd.getpwnam(self.names[role])
        full_env = {"HOME": account.pw_dir, "USER": account.pw_name, "LOGNAME": account.pw_name,
                    "PATH": f"{USER_PYTHON.parent}:/usr/local/bin:/usr/bin:/bin",
                    "LANG": "C.UTF-8", **(env or {})}
        cmd = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
               "--init-groups", "--", *argv]
        return subprocess.run(cmd, cwd=cwd or account.pw_dir, env=full_env, capture_output=True,
                              text=True, timeout=timeout)

    def leftovers(self) -> list[int]:
        return processes_of(self.uids)

    def remove(self) -> None:
        for pid in self.leftovers():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for name in self.names.values():
            subprocess.run(["userdel", "--remove", name], capture_output=True)


class Hub:
    """``jupyterhub`` with the course config, on free ports of 127.0.0.1, stopped by PID."""

    def __init__(self, state: Path, env: dict[str, str], extra_args: list[str]) -> None:
        self.state = state
        self.port, self.hub_port, self.api_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = state / "jupyterhub.log"
        cmd = [str(VENV / "bin" / "jupyterhub"), "-f", str(HUB_CONFIG), f"--port={self.port}",
               f"--JupyterHub.hub_port={self.hub_port}",
               f"--ConfigurableHTTPProxy.api_url=http://127.0.0.1:{self.api_port}",
               *extra_args]
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("JUPYTER", "PYTEST", "COV_"))}
        full_env.update(env, QCOURSE_HUB_STATE=str(state))
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, cwd=state, env=full_env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.proxy_pid: int | None = None

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyterhub exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/hub/api/", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"jupyterhub did not answer in {timeout} s:\n{self.tail()}")
            time.sleep(0.5)
        pid_file = self.state / "jupyterhub-proxy.pid"
        self.proxy_pid = int(pid_file.read_text()) if pid_file.is_file() else None

    def tail(self, n: int = 6000) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, timeout: float = 120) -> list[int]:
        """SIGTERM to the Hub (it stops the servers and the proxy); returns the PIDs it left."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()
        left = [pid for pid in (self.proc.pid, self.proxy_pid) if pid and alive(pid)]
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        return left


class HubUser:
    """One person on the Hub: logs in with a password, starts their server, uses its API."""

    def __init__(self, hub: Hub, name: str, password: str) -> None:
        self.hub, self.name = hub, name
        self.session = requests.Session()
        login = f"{hub.url}/hub/login"
        self.session.get(login, timeout=30).raise_for_status()
        xsrf = self.session.cookies.get("_xsrf", "")
        reply = self.session.post(login, data={"username": name, "password": password,
                                               "_xsrf": xsrf}, allow_redirects=False,
                                  timeout=60)
        if reply.status_code != 302 or "jupyterhub-session-id" not in self.session.cookies:
            raise RuntimeError(f"log-in as {name} failed: HTTP {reply.status_code}")
        # the XSRF token is tied to the session that logging in started: take the new one
        self.session.get(f"{hub.url}/hub/home", timeout=30).raise_for_status()
        xsrf = self.session.cookies.get("_xsrf", path="/hub/") or xsrf
        token = self.session.post(f"{hub.url}/hub/api/users/{name}/tokens",
                                  headers={"X-XSRFToken": xsrf},
                                  json={"note": "tests/test_hub.py", "expires_in": 3600},
                                  timeout=30)
        token.raise_for_status()
        self.token = token.json()["token"]
        self.api = requests.Session()
        self.api.headers["Authorization"] = f"token {self.token}"

    @property
    def server(self) -> str:
        return f"{self.hub.url}/user/{self.name}"

    def start_server(self, timeout: float = 300) -> None:
        reply = self.api.post(f"{self.hub.url}/hub/api/users/{self.name}/server", timeout=60)
        if reply.status_code not in (201, 202, 400):  # 400: already running
            raise RuntimeError(f"starting {self.name}'s server: HTTP {reply.status_code} "
                               f"{reply.text}")
        deadline = time.monotonic() + timeout
        while True:
            info = self.api.get(f"{self.hub.url}/hub/api/users/{self.name}", timeout=30).json()
            server = info.get("servers", {}).get("", {})
            if server.get("ready"):
                return
            if not server.get("pending") and time.monotonic() > deadline - timeout + 10 \
                    and not server:
                raise RuntimeError(f"{self.name}'s server did not start:\n{self.hub.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}'s server not ready in {timeout} s:\n"
                                   f"{self.hub.tail()}")
            time.sleep(1)

    def get(self, path: str, **kw) -> requests.Response:
        reply = self.api.get(f"{self.server}/{path}", timeout=kw.pop("timeout", 120), **kw)
        reply.raise_for_status()
        return reply

    def post(self, path: str, **kw) -> requests.Response:
        reply = self.api.post(f"{self.server}/{path}", timeout=kw.pop("timeout", 300), **kw)
        reply.raise_for_status()
        return reply

    def put(self, path: str, **kw) -> requests.Response:
        reply = self.api.put(f"{self.server}/{path}", timeout=kw.pop("timeout", 120), **kw)
        reply.raise_for_status()
        return reply
