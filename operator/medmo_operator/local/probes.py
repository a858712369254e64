"""Readiness probes as the kubelet runs them: HTTP GET, TCP connect, or a command in the container."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
import threading
from collections.abc import Callable, Mapping

from .container import ContainerRun

# Probes go straight to the pod's address: a proxy configured for this process must not intercept them.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                      urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))


def resolve_port(port: int | str, container: Mapping) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise ValueError(f"container {container['name']} has no port named {port!r}")


def exec_in(run: ContainerRun, command: list[str]) -> list[str] | None:
    """``command`` run inside ``run``'s namespaces and root, as its user (None while it has no process)."""
    target = run.command_pid()
    if target is None or run.identity is None:
        return None
    nsenter = shutil.which("nsenter") or "nsenter"
    return [nsenter, f"--target={target}", "--mount", "--pid", "--root", "--wd",
            f"--setgid={run.identity.gid}", f"--setuid={run.identity.uid}", "--", *command]


def check(probe: Mapping, pod_ip: str, container: Mapping, command: list[str] | None, env: Mapping[str, str]) -> bool:
    """True when the probe passes. ``command`` is the exec probe's command as run in the container.

    gRPC probes are not run (no gRPC health client here): they pass, so such pods still become Ready.
    """
    timeout = float(probe.get("timeoutSeconds", 1))
    try:
        if "httpGet" in probe:
            spec = probe["httpGet"]
            url = (f"{spec.get('scheme', 'HTTP').lower()}://{spec.get('host') or pod_ip}:"
                   f"{resolve_port(spec['port'], container)}{spec.get('path', '/')}")
            headers = {h["name"]: h["value"] for h in spec.get("httpHeaders") or []}
            with _OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
                return 200 <= response.status < 400
        if "tcpSocket" in probe:
            spec = probe["tcpSocket"]
            with socket.create_connection((spec.get("host") or pod_ip, resolve_port(spec["port"], container)), timeout):
                return True
        if "exec" in probe:
            return subprocess.run(command or [], env=dict(env), timeout=timeout, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except (OSError, ValueError, urllib.error.URLError, subprocess.TimeoutExpired):
        return False
    return True


class ReadinessProber:
    """Probes one container process until it ends; its readiness flips after the probe's thresholds.

    ``changed(passed)`` is called when the verdict flips; ``stopping`` ends probing early.
    """

    def __init__(self, run: ContainerRun, pod_ip: str, stopping: threading.Event,
                 changed: Callable[[bool], None]):
        self.run = run
        self.process = run.process
        self.pod_ip = pod_ip
        self.stopping = stopping
        self.changed = changed

    def start(self, name: str) -> None:
        threading.Thread(target=self._loop, daemon=True, name=name).start()

    def _loop(self) -> None:
        probe = self.run.spec["readinessProbe"]
        period = float(probe.get("periodSeconds", 10))
        needed = {True: int(probe.get("successThreshold", 1)), False: int(probe.get("failureThreshold", 3))}
        streak, last, verdict = 0, None, False
        if self.stopping.wait(float(probe.get("initialDelaySeconds", 0))):
            return
        while self.process.poll() is None and not self.stopping.is_set():
            command = None
            if "exec" in probe:
                command = exec_in(self.run, list(probe["exec"].get("command") or []))
            passed = (command is not None or "exec" not in probe) and check(
                probe, self.pod_ip, self.run.spec, command, self.run.env)
            streak = streak + 1 if passed == last else 1
            last = passed
            if streak >= needed[passed] and verdict != passed and self.run.process is self.process:
                verdict = passed
                self.changed(passed)
            self.stopping.wait(period)
