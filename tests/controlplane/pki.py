"""Certificates and keys for a test control plane, made with the openssl command line.

One CA signs everything: a serving certificate for 127.0.0.1 (used by kube-apiserver,
kube-controller-manager and kube-scheduler) and one client certificate per identity. The
API server maps a client certificate's CN to the user name and its O fields to groups.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# A config of our own, so the result does not depend on the distribution's openssl.cnf.
_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {sans}
"""

SERVING_SANS = (
    "IP:127.0.0.1",
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class ControlPlanePKI:
    """Paths of everything the control plane's components and clients need."""

    ca: KeyPair
    serving: KeyPair
    service_account_key: Path  # private: signs service-account tokens
    service_account_pub: Path  # public: verifies them
    admin: KeyPair  # CN=medmo-admin, O=system:masters
    controller_manager: KeyPair  # CN=system:kube-controller-manager
    scheduler: KeyPair  # CN=system:kube-scheduler


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _new_key(path: Path, cwd: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=cwd)
    path.chmod(0o600)


def _subject(common_name: str, organizations: tuple[str, ...]) -> str:
    return "".join(f"/O={org}" for org in organizations) + f"/CN={common_name}"


def _signed(name: str, common_name: str, organizations: tuple[str, ...], profile: str, ca: KeyPair, cnf: Path) -> KeyPair:
    directory = cnf.parent
    pair = KeyPair(cert=directory / f"{name}.crt", key=directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    _new_key(pair.key, directory)
    _openssl("req", "-new", "-config", str(cnf), "-key", str(pair.key), "-subj", _subject(common_name, organizations),
             "-out", str(csr), cwd=directory)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-set_serial",
             f"0x{os.urandom(16).hex()}", "-days", "3650", "-sha256",
             "-extfile", str(cnf), "-extensions", profile, "-out", str(pair.cert), cwd=directory)
    csr.unlink()
    return pair


def generate(directory: Path) -> ControlPlanePKI:
    """Create a fresh CA and all certificates under ``directory``."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed to make the test control plane's certificates "
                           "(apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    cnf = directory / "openssl.cnf"
    cnf.write_text(_OPENSSL_CNF.format(sans=", ".join(SERVING_SANS)))

    ca = KeyPair(cert=directory / "ca.crt", key=directory / "ca.key")
    _new_key(ca.key, directory)
    _openssl("req", "-x509", "-new", "-config", str(cnf), "-extensions", "ca", "-key", str(ca.key),
             "-subj", "/CN=medmo-test-ca", "-days", "3650", "-sha256", "-out", str(ca.cert), cwd=directory)

    sa_key, sa_pub = directory / "service-account.key", directory / "service-account.pub"
    _new_key(sa_key, directory)
    _openssl("pkey", "-in", str(sa_key), "-pubout", "-out", str(sa_pub), cwd=directory)

    return ControlPlanePKI(
        ca=ca,
        serving=_signed("serving", "127.0.0.1", (), "server", ca, cnf),
        service_account_key=sa_key,
        service_account_pub=sa_pub,
        admin=_signed("admin", "medmo-admin", ("system:masters",), "client", ca, cnf),
        controller_manager=_signed("controller-manager", "system:kube-controller-manager", (), "client", ca, cnf),
        scheduler=_signed("scheduler", "system:kube-scheduler", (), "client", ca, cnf),
    )
