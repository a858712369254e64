"""Pure parts of the test-server harness: certificates and port choice (no server is started)."""

from __future__ import annotations

import socket
import subprocess

from controlplane import pki
from controlplane.processes import free_ports


def openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=True).stdout


def test_every_certificate_chains_to_the_ca_and_carries_its_identity(tmp_path):
    certs = pki.generate(tmp_path)

    for pair in (certs.serving, certs.admin, certs.controller_manager, certs.scheduler):
        assert openssl("verify", "-CAfile", str(certs.ca.cert), str(pair.cert)).strip().endswith(": OK")
    assert "O = system:masters, CN = medmo-admin" in openssl("x509", "-in", str(certs.admin.cert), "-noout", "-subject")
    assert "CN = system:kube-scheduler" in openssl("x509", "-in", str(certs.scheduler.cert), "-noout", "-subject")
    serving = openssl("x509", "-in", str(certs.serving.cert), "-noout", "-ext", "subjectAltName,extendedKeyUsage")
    assert "IP Address:127.0.0.1" in serving and "TLS Web Server Authentication" in serving
    assert (certs.admin.key.stat().st_mode & 0o777) == 0o600


def test_free_ports_are_distinct_and_bindable_with_their_grpc_twins():
    ports = free_ports(6, twin_offset=10000)

    assert len(set(ports)) == 6
    for port in ports:
        for candidate in (port, port + 10000):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", candidate))
