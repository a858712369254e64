"""Pure pieces of running a pod as local processes: what cannot run, env, volume files, identity.

Everything here works on pods as plain dicts in the API's camelCase form (what the API server
returns, or ``ApiClient.sanitize_for_serialization`` of a ``V1Pod``) and reads ConfigMaps and
Secrets through an :class:`ObjectSource`, so it is tested without a cluster.
"""

from __future__ import annotations

import base64
import pwd
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# Volume types the runner can mount; anything else ends the pod as Failed.
SUPPORTED_VOLUME_TYPES = ("configMap", "secret", "emptyDir", "downwardAPI", "projected", "hostPath")
_VAR_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


class PodConfigError(Exception):
    """A referenced ConfigMap, Secret or key is missing; the kubelet retries such pods."""


class ObjectSource(Protocol):
    """Where ConfigMaps, Secrets and service-account tokens come from (the API, or a dict)."""

    def config_map(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The ConfigMap's data and binaryData, or None when it does not exist."""

    def secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The Secret's decoded data, or None when it does not exist."""

    def service_account_token(self, namespace: str, service_account: str, audience: str | None,
                              expiration_seconds: int, pod: tuple[str, str] | None = None) -> str | None:
        """A token for the service account (bound to ``pod``, its name and uid, as a kubelet binds
        it), or None where no API server issues tokens."""


@dataclass
class StaticObjects:
    """An :class:`ObjectSource` over objects given up front (the local backend, unit tests)."""

    config_maps: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)
    secrets: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)

    def add(self, obj: Mapping) -> None:
        """Add a ConfigMap or Secret given as an API dict (Secret data base64, stringData plain)."""
        key = (obj["metadata"].get("namespace", "default"), obj["metadata"]["name"])
        if obj.get("kind") == "Secret":
            data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
            data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
            self.secrets[key] = data
        elif obj.get("kind") == "ConfigMap":
            data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
            self.config_maps[key] = data
        else:
            raise ValueError(f"StaticObjects holds ConfigMaps and Secrets, not {obj.get('kind')!r}")

    def config_map(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return self.config_maps.get((namespace, name))

    def secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return self.secrets.get((namespace, name))

    def service_account_token(self, namespace: str, service_account: str, audience: str | None,
                              expiration_seconds: int, pod: tuple[str, str] | None = None) -> str | None:
        return None


def image_entrypoint(image: str, entrypoints: Mapping[str, list[str]]) -> list[str] | None:
    """The command an image would run, looked up by the full image reference, then without tag/digest."""
    repository = re.sub(r"(@.*|:[^/:]*)$", "", image or "")
    return entrypoints.get(image) or entrypoints.get(repository)


def container_command(container: Mapping, entrypoints: Mapping[str, list[str]]) -> list[str]:
    """command + args, with the image's entrypoint standing in for a missing command."""
    command = container.get("command") or image_entrypoint(container.get("image", ""), entrypoints) or []
    return list(command) + list(container.get("args") or [])


def unsupported_features(pod: Mapping, entrypoints: Mapping[str, list[str]]) -> list[str]:
    """The fields of ``pod`` that processes on loopback addresses cannot honour, as field paths.

    ``entrypoints`` maps images to the command they run, for containers that give only args.
    """
    spec = pod.get("spec") or {}
    found = [f"spec.{flag}" for flag in ("hostNetwork", "hostPID", "hostIPC") if spec.get(flag)]
    for volume in spec.get("volumes") or []:
        kind = next((k for k in volume if k != "name"), None)
        if kind not in SUPPORTED_VOLUME_TYPES:
            found.append(f"spec.volumes[{volume['name']}].{kind}")
    for group in ("initContainers", "containers"):
        for container in spec.get(group) or []:
            where = f"spec.{group}[{container['name']}]"
            if ((container.get("securityContext") or {}).get("privileged")):
                found.append(f"{where}.securityContext.privileged")
            if any(port.get("hostPort") for port in container.get("ports") or []):
                found.append(f"{where}.ports.hostPort")
            if group == "initContainers" and container.get("restartPolicy") == "Always":
                found.append(f"{where}.restartPolicy (sidecar containers)")
            if not container_command(container, entrypoints):
                found.append(f"{where}.command (images are not run: give a command, or the image's "
                             "entrypoint to the runner)")
    return found


def field_ref_value(pod: Mapping, field_path: str, pod_ip: str) -> str:
    """The value of a downward-API ``fieldRef`` such as ``metadata.labels['app']``."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    subscript = _FIELD_SUBSCRIPT.match(field_path)
    if subscript:
        return str((metadata.get(subscript.group(1)) or {}).get(subscript.group(2), ""))
    simple = {
        "metadata.name": metadata.get("name", ""),
        "metadata.namespace": metadata.get("namespace", "default"),
        "metadata.uid": metadata.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
    }
    if field_path in simple:
        return str(simple[field_path])
    if field_path in ("metadata.labels", "metadata.annotations"):
        items = sorted((metadata.get(field_path.split(".")[1]) or {}).items())
        return "".join(f'{k}="{v}"\n' for k, v in items)
    raise PodConfigError(f"fieldRef {field_path!r} is not a field the downward API offers")


def expand_references(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` escapes, others stay."""
    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REFERENCE.sub(replace, text)


def _key_of(source: ObjectSource, namespace: str, ref: Mapping, kind: str) -> str | None:
    data = (source.config_map if kind == "configMap" else source.secret)(namespace, ref["name"])
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        what = f"{kind} {namespace}/{ref['name']}" + ("" if data is None else f" has no key {ref['key']!r}")
        raise PodConfigError(f"{what} not found" if data is None else what)
    return data[ref["key"]].decode(errors="replace")


def resolve_env(pod: Mapping, container: Mapping, source: ObjectSource, pod_ip: str) -> dict[str, str]:
    """The container's environment from ``envFrom`` then ``env``, as the kubelet builds it."""
    namespace = (pod.get("metadata") or {}).get("namespace", "default")
    env: dict[str, str] = {}
    for env_from in container.get("envFrom") or []:
        kind = "configMap" if "configMapRef" in env_from else "secret"
        ref = env_from.get("configMapRef") or env_from.get("secretRef")
        data = (source.config_map if kind == "configMap" else source.secret)(namespace, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise PodConfigError(f"{kind} {namespace}/{ref['name']} not found (envFrom)")
        prefix = env_from.get("prefix", "")
        env.update({prefix + k: v.decode(errors="replace") for k, v in data.items()})
    for var in container.get("env") or []:
        value_from = var.get("valueFrom")
        if value_from is None:
            env[var["name"]] = expand_references(var.get("value") or "", env)
        elif "fieldRef" in value_from:
            env[var["name"]] = field_ref_value(pod, value_from["fieldRef"]["fieldPath"], pod_ip)
        elif "configMapKeyRef" in value_from or "secretKeyRef" in value_from:
            kind = "configMap" if "configMapKeyRef" in value_from else "secret"
            value = _key_of(source, namespace, value_from[f"{kind}KeyRef"], kind)
            if value is not None:
                env[var["name"]] = value
        elif "resourceFieldRef" in value_from:
            env[var["name"]] = _resource_field(container, value_from["resourceFieldRef"])
        else:
            raise PodConfigError(f"env {var['name']}: unsupported valueFrom {sorted(value_from)}")
    return env


def _resource_field(container: Mapping, ref: Mapping) -> str:
    """``limits.cpu``-style values as written in the spec (the divisor is not applied)."""
    section, _, resource = ref["resource"].partition(".")
    return str(((container.get("resources") or {}).get(section) or {}).get(resource, "0"))


def _items(data: Mapping[str, bytes], items: list | None, optional: bool, what: str) -> dict[str, bytes]:
    if not items:
        return dict(data)
    files = {}
    for item in items:
        if item["key"] in data:
            files[item["path"]] = data[item["key"]]
        elif not optional:
            raise PodConfigError(f"{what} has no key {item['key']!r}")
    return files


def _downward_files(pod: Mapping, items: list | None, pod_ip: str) -> dict[str, bytes]:
    files = {}
    for item in items or []:
        if "fieldRef" in item:
            files[item["path"]] = field_ref_value(pod, item["fieldRef"]["fieldPath"], pod_ip).encode()
        else:
            raise PodConfigError(f"downwardAPI item {item['path']!r}: only fieldRef is supported")
    return files


def _object_files(kind: str, ref: Mapping, namespace: str, source: ObjectSource) -> dict[str, bytes]:
    name = ref.get("name") or ref.get("secretName")
    data = (source.config_map if kind == "configMap" else source.secret)(namespace, name)
    what = f"{kind} {namespace}/{name}"
    if data is None:
        if ref.get("optional"):
            return {}
        raise PodConfigError(f"{what} not found")
    return _items(data, ref.get("items"), bool(ref.get("optional")), what)


def volume_files(pod: Mapping, volume: Mapping, source: ObjectSource, pod_ip: str) -> dict[str, bytes]:
    """The files (relative path -> content) a volume starts with; empty for ``emptyDir``."""
    namespace = (pod.get("metadata") or {}).get("namespace", "default")
    if "emptyDir" in volume:
        return {}
    if "configMap" in volume or "secret" in volume:
        kind = "configMap" if "configMap" in volume else "secret"
        return _object_files(kind, volume[kind], namespace, source)
    if "downwardAPI" in volume:
        return _downward_files(pod, volume["downwardAPI"].get("items"), pod_ip)
    files: dict[str, bytes] = {}
    for projection in volume["projected"].get("sources") or []:
        if "configMap" in projection or "secret" in projection:
            kind = "configMap" if "configMap" in projection else "secret"
            files.update(_object_files(kind, projection[kind], namespace, source))
        elif "downwardAPI" in projection:
            files.update(_downward_files(pod, projection["downwardAPI"].get("items"), pod_ip))
        elif "serviceAccountToken" in projection:
            files.update(token_file(pod, projection["serviceAccountToken"], source))
        else:
            raise PodConfigError(f"projected volume {volume['name']}: unsupported source {sorted(projection)}")
    return files


def token_projections(volume: Mapping) -> list[Mapping]:
    """The ``serviceAccountToken`` sources of a projected volume (none for other volumes)."""
    return [p["serviceAccountToken"] for p in (volume.get("projected") or {}).get("sources") or []
            if "serviceAccountToken" in p]


def token_file(pod: Mapping, projection: Mapping, source: ObjectSource) -> dict[str, bytes]:
    """A ``serviceAccountToken`` projection's file: a token bound to the pod, freshly requested."""
    metadata = pod.get("metadata") or {}
    account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    bound = (metadata["name"], metadata["uid"]) if metadata.get("uid") else None
    token = source.service_account_token(metadata.get("namespace", "default"), account, projection.get("audience"),
                                         int(projection.get("expirationSeconds", 3600)), pod=bound)
    return {} if token is None else {projection["path"]: token.encode()}


@dataclass(frozen=True)
class Identity:
    """Who a container's process runs as, and how its root is confined (from its securityContext)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    read_only_root: bool
    no_new_privileges: bool


def _user_entry(uid: int) -> pwd.struct_passwd | None:
    """The image's /etc/passwd entry (the image is this host)."""
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        return None


def container_identity(pod: Mapping, container: Mapping) -> Identity:
    """The container's user, groups and root confinement, as the kubelet resolves its securityContext.

    Container fields win over the pod's; without ``runAsUser`` the image's user (root) runs it.
    Raises :class:`PodConfigError` (the kubelet's CreateContainerConfigError) when ``runAsNonRoot``
    is asked of a container that would run as root.
    """
    pod_context = (pod.get("spec") or {}).get("securityContext") or {}
    context = container.get("securityContext") or {}

    def setting(name: str):
        return context[name] if context.get(name) is not None else pod_context.get(name)

    uid = int(setting("runAsUser") or 0)
    if setting("runAsNonRoot") and uid == 0:
        raise PodConfigError(f"container {container['name']} has runAsNonRoot and image will run as root "
                             "(set securityContext.runAsUser to a non-zero uid)")
    entry = _user_entry(uid)
    gid = setting("runAsGroup")
    gid = int(gid) if gid is not None else (entry.pw_gid if entry else 0)
    groups = [int(g) for g in pod_context.get("supplementalGroups") or []]
    if pod_context.get("fsGroup") is not None:
        groups.insert(0, int(pod_context["fsGroup"]))
    return Identity(uid=uid, gid=gid, groups=tuple(dict.fromkeys(groups)),
                    read_only_root=bool(context.get("readOnlyRootFilesystem")),
                    # Kubernetes' default: escalation allowed unless the container says otherwise.
                    no_new_privileges=context.get("allowPrivilegeEscalation") is False)


def home_of(uid: int) -> str:
    """HOME as a runtime sets it: the user's home in the image's /etc/passwd, else ``/``."""
    entry = _user_entry(uid)
    return entry.pw_dir if entry and entry.pw_dir else "/"
