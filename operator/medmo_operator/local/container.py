"""One container of a pod: its confined process, its state as the API shows it, and its restarts."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from . import sandbox
from .podspec import DEFAULT_TERMINATION_MESSAGE_PATH, Identity
from .volumes import safe_name

TERMINATION_MESSAGE_LIMIT = 4096
FALLBACK_LOG_LINES = 80
START_ERROR_EXIT_CODE = 128  # what the kubelet reports for a container that could not start
SANDBOX_SCRIPT = Path(sandbox.__file__)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ContainerRun:
    """A container's process (a :mod:`sandbox` launcher), state, restarts and termination message.

    ``launch`` starts it; the thread that calls it must stay alive while it runs (it is what the
    launcher's parent-death signal is tied to), as the thread that waits on it does.
    """

    def __init__(self, spec: dict, directory: Path, log_path: Path, init: bool):
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.state: dict = {"waiting": {"reason": "PodInitializing" if not init else "ContainerCreating"}}
        self.last_state: dict = {}
        self.restart_count = 0
        self.process: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.identity: Identity | None = None
        self.probe_passed = False  # the readiness probe's verdict on the current process
        self.directory = directory
        self.log_path = log_path
        self.termination_log = directory / "termination-log"
        self.start_error = directory / "start-error"

    @classmethod
    def of(cls, spec: dict, pod_directory: Path, init: bool) -> ContainerRun:
        name = safe_name(spec["name"])
        return cls(spec, pod_directory / "containers" / name, pod_directory / "logs" / f"{name}.log", init)

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def ready(self) -> bool:
        """Running, and passing its readiness probe if it has one."""
        return self.running and (self.probe_passed or "readinessProbe" not in self.spec)

    @property
    def terminated(self) -> dict | None:
        return self.state.get("terminated")

    def status(self) -> dict:
        status = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "started": self.running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.process is not None:
            # The launcher's pid, so a test (or a person) can find and signal the container.
            status["containerID"] = f"local://{self.process.pid}"
        return status

    def launch(self, command: list[str], env: dict[str, str], identity: Identity,
               mounts: list[sandbox.Mount], open_up: list[str], hostname: str) -> None:
        """Start the confined process (leader of a new process group), output to the log file."""
        upper, work, root = (self.directory / part for part in ("upper", "work", "root"))
        for layer in (upper, work):  # a restarted container starts from the image again
            shutil.rmtree(layer, ignore_errors=True)
        for path in (upper, work, root):
            path.mkdir(parents=True, exist_ok=True)
        self.termination_log.write_bytes(b"")
        self.termination_log.chmod(0o666)  # the container's user writes it
        self.start_error.write_bytes(b"")
        spec = sandbox.SandboxSpec(
            command=command, env=env, uid=identity.uid, gid=identity.gid, groups=list(identity.groups),
            working_dir=self.spec.get("workingDir") or "/", root=str(root), upper=str(upper), work=str(work),
            start_error=str(self.start_error), runner_pid=os.getpid(), hostname=hostname,
            read_only_root=identity.read_only_root,
            no_new_privileges=identity.no_new_privileges, mounts=mounts, termination_log=str(self.termination_log),
            termination_log_path=self.spec.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH,
            open_up=open_up)
        self.env, self.identity, self.probe_passed = env, identity, False
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen([sys.executable, "-I", "-S", str(SANDBOX_SCRIPT)], env={},
                                            stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.process.stdin.write(spec.to_json().encode())  # on a pipe, never on disk: env holds secrets
        self.process.stdin.close()
        self.state = {"running": {"startedAt": now()}}

    def finish(self, returncode: int) -> dict:
        """Record the exit as a terminated state (the container's PID namespace is gone with it)."""
        started = self.state.get("running", {}).get("startedAt", now())
        start_error = self.start_error.read_text(errors="replace") if self.start_error.exists() else ""
        if start_error:
            terminated = {"exitCode": START_ERROR_EXIT_CODE, "reason": "StartError", "message": start_error}
        else:
            exit_code = returncode if returncode >= 0 else 128 - returncode
            terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}
            if returncode < 0:
                terminated["signal"] = -returncode
            message = self._termination_message(exit_code)
            if message:
                terminated["message"] = message
        terminated.update(startedAt=started, finishedAt=now(), containerID=f"local://{self.process.pid}")
        self.state = {"terminated": terminated}
        return terminated

    def _termination_message(self, exit_code: int) -> str:
        try:
            message = self.termination_log.read_bytes()[:TERMINATION_MESSAGE_LIMIT]
        except FileNotFoundError:
            message = b""
        if not message.strip() and exit_code != 0 and self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = self.log_path.read_bytes().splitlines()[-FALLBACK_LOG_LINES:]
            message = b"\n".join(lines)[-TERMINATION_MESSAGE_LIMIT // 2:]
        return message.decode(errors="replace")

    def signal(self, sig: int) -> None:
        """Signal the container as a runtime stops it: its init passes ``sig`` on to the command."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.kill(self.process.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the container: its init (PID 1 of its namespace) takes every process in it along,
        and the launcher exits once they are all gone, so waiting on the launcher waits for them."""
        if self.process is None or self.process.poll() is not None:
            return
        init = next(iter(_children(self.process.pid)), None)
        try:
            os.kill(init if init is not None else self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def command_pid(self) -> int | None:
        """The host pid of the container's command (the launcher's grandchild), while it runs."""
        if self.process is None:
            return None
        init = next(iter(_children(self.process.pid)), None)
        return None if init is None else next(iter(_children(init)), None)


def _children(parent: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == parent:
                        children.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return sorted(children)
