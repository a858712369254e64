"""One readiness check of a container, as the kubelet runs it: HTTP GET, TCP connect, or a command."""

from __future__ import annotations

import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping

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


def check(probe: Mapping, pod_ip: str, container: Mapping, command: list[str] | None, env: Mapping[str, str]) -> bool:
    """True when the probe passes. ``command`` is the exec probe's command with paths rewritten.

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
