"""Pod networking on one machine: one loopback address per pod, names from per-pod hosts files.

Why not network namespaces: a pod in its own namespace (veth pair, ``ip netns``) no longer reaches
services that listen only on the host's 127.0.0.1 (the S3 server, the API server, the operator's
progress endpoint), and giving it a route back means non-loopback addresses, NAT and root, none of
which are allowed here. Linux routes all of 127.0.0.0/8 to ``lo`` instead, so every pod gets its own
127.x.y.z, and:

- an LD_PRELOAD shim (``podnet_shim.c``, compiled with the system C compiler on first use into a
  cache keyed by its source) rewrites ``bind()`` to wildcard or localhost addresses into the pod's
  address, since real servers (torch's TCPStore, http servers) bind 0.0.0.0 or ::; ``connect()`` to
  localhost reaches the pod's own servers on the ports they listen on and the host's otherwise;
- Debian's libnss-wrapper (``NSS_WRAPPER_HOSTS``, ``NSS_WRAPPER_HOSTNAME``) gives every pod its
  own hosts file and hostname, rewritten as pods and Services come and go.

Programs that do not use the C library's resolver and sockets (static Go binaries) see neither.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

NSS_WRAPPER_SEARCH = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
CLUSTER_DOMAIN = "cluster.local"
HOST_ADDRESS = "127.0.0.1"
# Second octets handed out to address pools; 127.0.x.x is left to the host (127.0.0.1, 127.0.1.1).
_POOL_OCTETS = range(20, 250)


class NetworkSetupError(RuntimeError):
    """The pod network cannot be set up on this machine (a missing system package, no compiler)."""


def cache_dir() -> Path:
    return Path(os.environ.get("MEDMO_CACHE", Path.home() / ".cache" / "medmo"))


def find_nss_wrapper() -> Path:
    """Path of libnss_wrapper.so, or an error saying how to install it."""
    candidates = [os.environ.get("MEDMO_NSS_WRAPPER", "")]
    candidates += [f"{d}/libnss_wrapper.so" for d in NSS_WRAPPER_SEARCH]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise NetworkSetupError("libnss_wrapper.so not found: run scripts/system-deps.sh "
                            "(apt-get install libnss-wrapper) or set MEDMO_NSS_WRAPPER to its path")


def build_shim() -> Path:
    """The compiled LD_PRELOAD shim, built once per source version under the medmo cache."""
    source = resources.files(__package__).joinpath("podnet_shim.c").read_bytes()
    target = cache_dir() / "podnet" / hashlib.sha256(source).hexdigest()[:16] / "podnet_shim.so"
    if target.is_file():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise NetworkSetupError("no C compiler to build the pod network shim: run scripts/system-deps.sh")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "podnet_shim.c"
        src.write_bytes(source)
        built = Path(tmp) / "podnet_shim.so"
        result = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(src), "-ldl"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise NetworkSetupError(f"compiling the pod network shim failed:\n{result.stderr}")
        os.replace(built, target)  # atomic: concurrent builders each install a complete file
    return target


class AddressPool:
    """Pod addresses from a 127.N.0.0/16 that this pool holds alone on the machine.

    The /16 is claimed with an flock on a file in the temp dir, held for the pool's lifetime (the
    kernel drops it when the process dies), so agents and local runs side by side never share an
    address.
    """

    def __init__(self) -> None:
        lock_dir = Path(tempfile.gettempdir()) / "medmo-pod-addresses"
        lock_dir.mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._free: list[str] = []
        self._lock_file = None
        for octet in _POOL_OCTETS:
            handle = open(lock_dir / f"127.{octet}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            self._lock_file = handle
            self.prefix = f"127.{octet}"
            break
        else:
            raise NetworkSetupError(f"every pod address range in {lock_dir} is held by another process")
        # .0 and .255 stay unused as last octets: some programs treat them as network/broadcast.
        self._free = [f"{self.prefix}.{hi}.{lo}" for hi in range(256) for lo in range(1, 255)][::-1]

    def acquire(self) -> str:
        with self._lock:
            if not self._free:
                raise NetworkSetupError(f"all pod addresses in {self.prefix}.0.0/16 are in use")
            return self._free.pop()

    def release(self, address: str) -> None:
        with self._lock:
            self._free.append(address)

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _serving(pod: Mapping) -> bool:
    """A pod that answers at its address: running, not terminating, with an address."""
    status = pod.get("status") or {}
    return (bool(status.get("podIP")) and status.get("phase") not in ("Succeeded", "Failed")
            and not (pod.get("metadata") or {}).get("deletionTimestamp"))


def _ready(pod: Mapping) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def _published(pod: Mapping, service: Mapping) -> bool:
    """Whether a Service's names lead to the pod: when it is Ready, or always with publishNotReadyAddresses."""
    return _ready(pod) or bool((service.get("spec") or {}).get("publishNotReadyAddresses"))


def dns_records(client_namespace: str, pods: Iterable[Mapping], services: Iterable[Mapping]) -> list[tuple[str, list[str]]]:
    """What cluster DNS would answer for a pod in ``client_namespace``, as (address, names) pairs.

    A Service name resolves to the addresses of the Ready pods it selects (all of them with
    ``publishNotReadyAddresses``), as for a headless Service: there is no kube-proxy, and
    EndpointSlices cannot hold loopback addresses, so the pods are selected here. A pod with
    ``hostname`` and ``subdomain`` gets ``<hostname>.<subdomain>`` when a headless Service of that
    name exists in its namespace, under the same readiness rule.
    """
    pods = [p for p in pods if _serving(p)]
    services = list(services)
    headless = {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in services
                if (s.get("spec") or {}).get("clusterIP") == "None"}
    records: list[tuple[str, list[str]]] = []
    for service in services:
        namespace, name = service["metadata"]["namespace"], service["metadata"]["name"]
        names = _qualified(f"{name}.{namespace}", same_namespace=namespace == client_namespace, short=name)
        selector = (service.get("spec") or {}).get("selector") or {}
        for pod in pods:
            if (pod["metadata"].get("namespace") == namespace and _selects(selector, pod["metadata"].get("labels") or {})
                    and _published(pod, service)):
                records.append((pod["status"]["podIP"], names))
    for pod in pods:
        spec, namespace = pod.get("spec") or {}, pod["metadata"].get("namespace", "default")
        hostname, subdomain = spec.get("hostname"), spec.get("subdomain")
        governing = headless.get((namespace, subdomain))
        if hostname and governing and _published(pod, governing):
            short = f"{hostname}.{subdomain}"
            names = _qualified(f"{short}.{namespace}", same_namespace=namespace == client_namespace, short=short)
            records.append((pod["status"]["podIP"], names))
    return records


def _qualified(name_dot_namespace: str, same_namespace: bool, short: str) -> list[str]:
    names = [f"{name_dot_namespace}.svc.{CLUSTER_DOMAIN}", f"{name_dot_namespace}.svc", name_dot_namespace]
    return names + [short] if same_namespace else names


def pod_hostname(pod: Mapping) -> str:
    spec = pod.get("spec") or {}
    return spec.get("hostname") or pod["metadata"]["name"]


def render_hosts(pod: Mapping, pod_ip: str, records: Iterable[tuple[str, list[str]]]) -> str:
    """A pod's hosts file: localhost, its own names (as the kubelet writes them), then the cluster's."""
    hostname = pod_hostname(pod)
    subdomain = (pod.get("spec") or {}).get("subdomain")
    namespace = pod["metadata"].get("namespace", "default")
    own = [f"{hostname}.{subdomain}.{namespace}.svc.{CLUSTER_DOMAIN}", hostname] if subdomain else [hostname]
    lines = [f"{HOST_ADDRESS} localhost", "::1 localhost ip6-localhost ip6-loopback", f"{pod_ip} {' '.join(own)}"]
    lines += [f"{address} {' '.join(names)}" for address, names in records]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one step, so a resolver never reads half a hosts file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


POD_NETWORK_MOUNT = "/run/medmo-podnet"
"""Where a pod's network directory (hosts file, ports, the preloaded libraries) appears in its containers."""
PORTS = "ports"
HOSTS = "hosts"


def prepare_pod_network(directory: Path, shim: Path, nss_wrapper: Path) -> None:
    """A pod's network directory: the libraries it preloads, and a ports directory any user may write.

    Containers bind the directory, not its files: the hosts file is replaced (a new inode) on
    every change, and a bound file would keep showing the old one.
    """
    (directory / PORTS).mkdir(parents=True, exist_ok=True)
    (directory / PORTS).chmod(0o777)
    for library in (shim, nss_wrapper):
        copy = directory / library.name
        if not copy.exists():
            shutil.copyfile(library, copy)
            copy.chmod(0o755)


def pod_network_env(pod_ip: str, hostname: str, shim: Path, nss_wrapper: Path) -> dict[str, str]:
    """The environment that puts a container's processes on the pod's address with the pod's names."""
    inside = Path(POD_NETWORK_MOUNT)
    return {
        "LD_PRELOAD": f"{inside / shim.name} {inside / nss_wrapper.name}",
        "MEDMO_POD_IP": pod_ip,
        "MEDMO_POD_PORTS_DIR": str(inside / PORTS),
        "NSS_WRAPPER_HOSTS": str(inside / HOSTS),
        "NSS_WRAPPER_HOSTNAME": hostname,
        "HOSTNAME": hostname,
    }
