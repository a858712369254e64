"""Child processes of the test servers: started with logs in files, stopped by pid, and tracked.

Every process started through :func:`spawn` is remembered in this module, so a test session can
check at its end that none of them is still running (:func:`still_running`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_started: list[ManagedProcess] = []
# What Go servers and `weed mini` log when a port is taken.
_PORT_TAKEN_SIGNS = ("address already in use", "Port allocation failed")


class ServerStartError(RuntimeError):
    """A test server did not start or did not become ready in time."""


@dataclass
class ManagedProcess:
    """One child process and the file its stdout and stderr go to."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_running(self) -> None:
        """Raise with the end of the log if the process has exited."""
        if not self.running():
            raise ServerStartError(
                f"{self.name} exited with status {self.popen.returncode}; "
                f"end of {self.log_path}:\n{self.log_tail()}"
            )

    def stop(self, first_signal: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
        """Send ``first_signal``, then SIGKILL if the process outlives ``grace_s``; reap it."""
        if not self.running():
            return
        try:
            os.kill(self.pid, first_signal)
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=30)
        except ProcessLookupError:
            self.popen.wait(timeout=30)


def _die_with_parent() -> None:
    # Runs in the child before exec: if the test runner is killed outright (no atexit), the
    # kernel sends SIGKILL to its servers instead of leaving them running.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> ManagedProcess:
    """Start ``argv`` with stdin closed and stdout+stderr appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # PDEATHSIG fires when the *thread* that forked exits, so it is only safe from the main thread.
    on_main_thread = threading.current_thread() is threading.main_thread()
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C in a terminal reaches the runner, which stops them in order
            preexec_fn=_die_with_parent if on_main_thread else None,
        )
    proc = ManagedProcess(name=name, popen=popen, log_path=log_path)
    _started.append(proc)
    return proc


def start_retrying_lost_ports(start, clean_up, attempts: int = 3) -> None:
    """Call ``start()``; if a server lost one of its free ports to another process before binding
    it, ``clean_up()`` (stop what started, drop state tied to the ports) and start again."""
    for attempt in range(1, attempts + 1):
        try:
            start()
            return
        except ServerStartError as error:
            clean_up()
            if not any(sign in str(error) for sign in _PORT_TAKEN_SIGNS) or attempt == attempts:
                raise
        except BaseException:
            clean_up()
            raise


def still_running() -> list[ManagedProcess]:
    """Processes started by :func:`spawn` in this interpreter that have not exited."""
    return [p for p in _started if p.running()]


def wait_until(predicate, timeout_s: float, what: str, processes: list[ManagedProcess], interval_s: float = 0.2):
    """Poll ``predicate`` until it returns a truthy value; fail early if a process dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        for proc in processes:
            proc.check_running()
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name} ({p.log_path}):\n{p.log_tail(15)}" for p in processes)
            raise ServerStartError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")
        time.sleep(interval_s)


def free_ports(count: int, twin_offset: int | None = None) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that are free now.

    With ``twin_offset``, each returned port ``p`` also has ``p + twin_offset`` free (SeaweedFS
    components reach each other's gRPC on http port + 10000 whatever their flags say).
    All candidates are held open until the choice is made, so no port is handed out twice.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(50 * count):
            if len(ports) == count:
                return ports
            sock = socket.socket()
            held.append(sock)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if twin_offset is not None:
                twin = socket.socket()
                held.append(twin)
                try:
                    twin.bind(("127.0.0.1", port + twin_offset))
                except (OSError, OverflowError):
                    continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    if len(ports) == count:
        return ports
    raise ServerStartError(f"could not find {count} free ports on 127.0.0.1")
