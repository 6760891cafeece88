"""The grading sandbox: student code runs inside bubblewrap, under its own user id and limits.

At grading time every process that runs student code (nbgrader's kernel and the split run's
student process) starts as::

    bwrap [namespaces, a file system of read-only binds and two small tmpfs] --
        setpriv --reuid UID --regid UID --clear-groups --no-new-privs --
        prlimit --cpu --as --nproc --fsize --nofile -- python ...

What that prevents, and how (each is a test in ``tests/test_sandbox.py``):

- **writes outside its folder**: the only writable places are a size-limited tmpfs at the
  submission's working directory and a private ``/tmp``; the Python installation and qcourse
  are bound read-only, everything else is absent;
- **reading other submissions, the gradebook, the release, the hidden tests**: not bound, so not
  there (the course directory, the submissions folder and the repository's ``notebooks/`` are
  outside the sandbox's file system);
- **network**: a new network namespace with only its own loopback;
- **signals to the grader**: a new PID namespace (the grader has no PID inside) and an
  unprivileged user id (no permission to signal root's processes);
- **fork bombs**: ``RLIMIT_NPROC`` for a user id of its own (per worker), so other students'
  grading is not starved;
- **filling the disk**: the tmpfs sizes and ``RLIMIT_FSIZE``; **CPU and memory**: ``RLIMIT_CPU``
  and ``RLIMIT_AS``; output is cut by nbgrader's ``LimitOutput`` and ``truncate_outputs``.

``probe`` checks that bubblewrap works here; grading refuses to run student code unsandboxed
unless the instructor says so (``--no-sandbox``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

# User ids for sandboxed code: one per grading worker, none of them a real account.
BASE_UID = 64000


SANDBOX_ADVICE = ("Grading runs every submission inside bubblewrap; without it a submission "
                  "could read other students' work and the hidden tests, write anywhere this "
                  "user can, and reach the network. Install bubblewrap (Debian: apt-get install "
                  "bubblewrap) on a kernel with user namespaces, or, only for submissions you "
                  "trust, pass --no-sandbox")


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create its namespaces on this machine."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one sandboxed process tree may use (rlimits, and the sizes of its tmpfs)."""

    cpu_seconds: int = 900
    memory_bytes: int = 4 * 2**30
    processes: int = 64
    file_bytes: int = 16 * 2**20
    open_files: int = 512
    scratch_bytes: int = 64 * 2**20


def _read_only_roots() -> list[Path]:
    """What student code needs to read: Python, the environment, qcourse itself, and any
    package folder a ``.pth`` file added to ``sys.path`` (outside ``/usr``, bound whole)."""
    import qcourse

    roots = [Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(),
             Path(qcourse.__file__).resolve().parent]
    roots += [Path(p).resolve() for p in sys.path
              if p and Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    kept: list[Path] = []
    for root in sorted(set(roots), key=lambda p: len(p.parts)):
        if root.parts[1:2] in (("usr",), ("etc",)):
            continue
        if not any(root == k or k in root.parents for k in kept):
            kept.append(root)
    return kept


def _parents(paths: list[Path]) -> list[Path]:
    """Every directory above ``paths`` (bwrap would make them mode 0700: we make them 0755)."""
    seen: list[Path] = []
    for path in paths:
        for parent in reversed(path.parents):
            if parent != Path("/") and parent not in seen:
                seen.append(parent)
    return seen


@dataclasses.dataclass
class Sandbox:
    """A bubblewrap command line for running student code in ``workdir``.

    ``workdir`` becomes an empty tmpfs inside the sandbox (the code's only writable folder
    besides ``/tmp``); ``shared`` are host directories bound read-write at the same path (the
    kernel's ZeroMQ sockets); ``uid`` is the unprivileged user the code runs as.
    """

    workdir: Path
    uid: int = BASE_UID
    limits: Limits = dataclasses.field(default_factory=Limits)
    shared: tuple[Path, ...] = ()
    env: dict[str, str] = dataclasses.field(default_factory=dict)

    def _file_system(self) -> list[str]:
        args = ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
        for name in ("bin", "lib", "lib64", "sbin"):
            path = Path("/") / name
            if path.is_symlink():
                args += ["--symlink", os.readlink(path), str(path)]
            elif path.is_dir():
                args += ["--ro-bind", str(path), str(path)]
        args += ["--proc", "/proc", "--dev", "/dev",
                 "--perms", "1777", "--size", str(self.limits.scratch_bytes), "--tmpfs", "/tmp"]
        roots = _read_only_roots()
        mounts = [*roots, Path(self.workdir), *map(Path, self.shared)]
        for parent in _parents(mounts):
            if parent.parts[1] not in ("usr", "etc") and parent != Path("/tmp") and not any(
                    parent == m or m in parent.parents for m in mounts):
                args += ["--perms", "0755", "--dir", str(parent)]
        for root in roots:
            args += ["--ro-bind", str(root), str(root)]
        args += ["--perms", "0777", "--size", str(self.limits.scratch_bytes),
                 "--tmpfs", str(self.workdir)]
        for path in self.shared:
            args += ["--bind", str(path), str(path)]
        return args

    def _environment(self) -> list[str]:
        import qcourse

        # this qcourse first (the one bound read-only), whatever the install finds
        package_parent = str(Path(qcourse.__file__).resolve().parent.parent)
        env = {"PYTHONPATH": package_parent, "HOME": "/tmp",
               "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
               "LANG": "C.UTF-8", "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp/.matplotlib",
               "IPYTHONDIR": "/tmp/.ipython", "JUPYTER_RUNTIME_DIR": "/tmp/.jupyter",
               "PYTHONDONTWRITEBYTECODE": "1", "OPENBLAS_NUM_THREADS": "1",
               "OMP_NUM_THREADS": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1", **self.env}
        args = ["--clearenv"]
        for key, value in env.items():
            args += ["--setenv", key, value]
        return args

    def _identity(self) -> list[str]:
        """Root: no user namespace (``_drop_privileges`` changes the user inside). Any other
        user: a user namespace of its own, where the code is ``uid`` and may not make another;
        ``RLIMIT_NPROC`` then counts only the processes of that namespace (Linux 5.14 and
        later), so a fork bomb meets its limit without counting the grader's own processes."""
        if os.geteuid() == 0:
            return []
        return ["--unshare-user", "--uid", str(self.uid), "--gid", str(self.uid),
                "--disable-userns"]

    def _drop_privileges(self) -> list[str]:
        """As root, become ``uid`` (rlimits do not bind root) with no way back."""
        if os.geteuid() != 0:
            return []
        return [shutil.which("setpriv") or "/usr/bin/setpriv", f"--reuid={self.uid}",
                f"--regid={self.uid}", "--clear-groups", "--no-new-privs", "--"]

    def wrap(self, argv: list[str], info_fd: int | None = None) -> list[str]:
        """``argv`` as a command that runs inside the sandbox (``launch`` starts it: with
        ``info_fd``, bwrap writes there which process is the sandbox's init)."""
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
        limits = self.limits
        info = [] if info_fd is None else ["--info-fd", str(info_fd)]
        return [
            bwrap, *info, *self._identity(), "--unshare-ipc", "--unshare-pid", "--unshare-net",
            "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--hostname", "sandbox",
            *self._file_system(), *self._environment(), "--chdir", str(self.workdir), "--",
            *self._drop_privileges(),
            shutil.which("prlimit") or "/usr/bin/prlimit", f"--cpu={limits.cpu_seconds}",
            f"--as={limits.memory_bytes}", f"--nproc={limits.processes}",
            f"--fsize={limits.file_bytes}", f"--nofile={limits.open_files}", "--", *argv]


    def run(self, argv: list[str], timeout: float, **popen: Any) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``argv`` inside the sandbox, output captured as text; returns
        once every process of the sandbox has ended (``end``), on time-out too."""
        proc, init = launch(self, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            end(init)
            proc.communicate()
            raise
        end(init)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def launch(box: Sandbox, argv: list[str], **popen: Any) -> tuple[subprocess.Popen, int | None]:
    """Start ``argv`` inside ``box``: the bwrap process, and a pidfd of the sandbox's init.

    bwrap returns as soon as the code it ran exits, while the kernel is still ending the rest
    of the sandbox (a fork bomb's children, a kernel's subprocesses): give the pidfd to ``end``
    to stop them all and wait until they are gone. ``None``: the sandbox had already ended.
    """
    read_end, write_end = os.pipe()
    try:
        popen["pass_fds"] = (*popen.get("pass_fds", ()), write_end)
        proc = subprocess.Popen(box.wrap(argv, info_fd=write_end), **popen)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return proc, _init_pidfd(proc.pid, read_end)


def _init_pidfd(bwrap_pid: int, info_fd: int) -> int | None:
    """A pidfd of the init that bwrap ``bwrap_pid`` reports on ``info_fd`` (its ``--info-fd``
    JSON; closed here), once checked to be that process: bwrap's child, in the PID namespace
    it named."""
    import json

    with os.fdopen(info_fd, "rb") as info:  # bwrap writes it and closes it right after clone
        text = info.read()
    try:
        fields = json.loads(text)
        pid, namespace = int(fields["child-pid"]), int(fields["pid-namespace"])
    except (ValueError, KeyError, TypeError):
        return None  # bwrap failed before making the sandbox
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        parent = int(stat[stat.rfind(")") + 2:].split()[1])
        if parent == bwrap_pid and os.stat(f"/proc/{pid}/ns/pid").st_ino == namespace:
            return pidfd
    except (OSError, ValueError, IndexError):
        pass
    os.close(pidfd)  # gone already, and with it the whole sandbox
    return None


def end(init: int | None, timeout: float = 60.0) -> None:
    """Stop every process of a sandbox and wait until all have exited.

    ``init`` is the pidfd ``launch`` returned (closed here). Killing a PID namespace's init
    kills every process in it, and the init exits only after all of them have (Linux's
    ``zap_pid_ns_processes``): when its pidfd becomes readable, nothing of the sandbox runs,
    and its user id counts no process against the next sandbox's ``RLIMIT_NPROC``.
    """
    import select

    if init is None:
        return
    try:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(init, signal.SIGKILL)
        if not select.select([init], [], [], timeout)[0]:
            raise RuntimeError(f"the sandbox's processes did not exit within {timeout} s")
    finally:
        os.close(init)


def sandboxed_descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the bwrap process): the sandbox's init and what it runs."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            children.setdefault(int(stat[stat.rfind(")") + 2:].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def interrupt(pid: int, signum: int = signal.SIGINT) -> None:
    """Send ``signum`` to the sandboxed code under the bwrap process ``pid``.

    Not to bwrap itself, which would die of it and take the sandbox along: a kernel interrupt
    must stop the running cell, not the kernel. The sandbox's init ignores it (a PID namespace's
    init only gets signals it handles).
    """
    for child in sandboxed_descendants(pid):
        with contextlib.suppress(OSError):
            os.kill(child, signum)


def prepare_workdir(path: Path) -> None:
    """Make the host side of a sandbox's working directory (bwrap mounts a tmpfs over it)."""
    path.mkdir(parents=True, exist_ok=True)


def share_with(path: Path, uid: int) -> None:
    """Let the sandbox's user write to host directory ``path`` (the kernel's socket folder)."""
    with contextlib.suppress(OSError):
        os.chown(path, uid, uid)
    path.chmod(0o700)


def probe(workdir: Path | None = None) -> str | None:
    """Why sandboxed grading cannot run here (None when it can).

    Starts this Python inside a sandbox and asks it to import numpy and qcourse, as a kernel
    would.
    """
    import tempfile

    import qcourse

    scratch = Path(workdir or tempfile.mkdtemp(prefix="qcourse-probe-"))
    try:
        box = Sandbox(scratch / "work")
        prepare_workdir(box.workdir)
        proc = box.run([sys.executable, "-c", "import numpy, qcourse; print(qcourse.__file__)"],
                       timeout=120)
    except SandboxUnavailable as exc:
        return str(exc)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap did not run: {exc}"
    finally:
        if workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    if proc.returncode != 0 or proc.stdout.strip() != qcourse.__file__:
        return ("bubblewrap could not start Python with qcourse (exit "
                f"{proc.returncode}): {proc.stderr.strip()[-500:]}")
    return None


def kernel_manager_class() -> type:
    """A jupyter_client kernel manager that starts the kernel inside ``Sandbox``.

    The kernel talks to nbgrader over ZeroMQ IPC sockets in a folder shared with the sandbox
    (TCP on 127.0.0.1 would not cross the network namespace); interrupts go to the kernel, not
    to bwrap; shutting the kernel down waits until every process of its sandbox has ended.
    ``configure`` sets the sandbox for the kernels started next in this process.
    """
    from jupyter_client.manager import AsyncKernelManager

    class SandboxedKernelManager(AsyncKernelManager):
        sandbox: Sandbox | None = None

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            box = type(self).sandbox
            if box is None:
                raise SandboxUnavailable("no sandbox configured for this grading worker")
            self.transport = "ipc"
            sockets = box.shared[0]
            self.ip = str(sockets / "kernel")
            self.connection_file = str(sockets / "kernel.json")

        def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
            cmd = super().format_kernel_cmd(extra_arguments)
            box = type(self).sandbox
            with contextlib.suppress(OSError):
                os.chown(self.connection_file, box.uid, box.uid)
            return cmd

        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            read_end, write_end = os.pipe()
            kw["pass_fds"] = (*kw.get("pass_fds", ()), write_end)
            try:
                await super()._async_launch_kernel(
                    type(self).sandbox.wrap(kernel_cmd, info_fd=write_end), **kw)
            except BaseException:
                os.close(read_end)
                raise
            finally:
                os.close(write_end)
            self.sandbox_init = _init_pidfd(self.provisioner.process.pid, read_end)

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            """The kernel is stopped: so is everything it started, before the next kernel."""
            init, self.sandbox_init = getattr(self, "sandbox_init", None), None
            end(init)
            await super()._async_cleanup_resources(restart)

        async def _async_signal_kernel(self, signum: int) -> None:
            process = getattr(self.provisioner, "process", None)
            if signum == signal.SIGINT and process is not None:
                interrupt(process.pid, signum)
                return
            await super()._async_signal_kernel(signum)

    return SandboxedKernelManager
