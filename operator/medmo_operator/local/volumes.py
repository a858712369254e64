"""A pod's volumes on this machine: directories under the pod's directory (or a host path), made
as the kubelet makes them, and the mounts that put them at each container's mount paths."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from .podspec import ObjectSource, PodConfigError, token_file, token_projections, volume_files
from .sandbox import Mount

EMPTY_DIR_MODE = 0o777  # the kubelet's: any user of the pod may write an emptyDir
DEFAULT_FILE_MODE = 0o644  # configMap, secret, downwardAPI and projected files without defaultMode
TOKEN_REFRESH_FRACTION = 0.8
"""The kubelet's rule: a projected token is requested anew once 80 % of its lifetime has passed."""
DEFAULT_TOKEN_SECONDS = 3600
_HOST_PATH_DIRECTORY = ("", "DirectoryOrCreate", "Directory")
_HOST_PATH_FILE = ("FileOrCreate", "File")


def safe_name(text: str) -> str:
    """A name usable as one path component."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


class PodVolumes:
    """The volumes of one pod: ``prepare()`` makes them, ``mounts(container)`` binds them."""

    def __init__(self, pod: Mapping, directory: Path, objects: ObjectSource, pod_ip: str):
        self.pod = pod
        self.directory = directory
        self.objects = objects
        self.pod_ip = pod_ip
        self.volumes = {v["name"]: v for v in (pod.get("spec") or {}).get("volumes") or []}
        fs_group = ((pod.get("spec") or {}).get("securityContext") or {}).get("fsGroup")
        self.fs_group = None if fs_group is None else int(fs_group)
        self.tokens_issued: dict[str, float] = {}  # projected volume with tokens -> when they were requested (monotonic)

    def path(self, name: str) -> Path:
        """Where volume ``name`` lives on this machine."""
        volume = self.volumes.get(name, {})
        if "hostPath" in volume:
            return Path(volume["hostPath"]["path"])
        return self.directory / safe_name(name)

    def prepare(self) -> None:
        """Make every volume; raises :class:`PodConfigError` while a ConfigMap or Secret is missing."""
        for name, volume in self.volumes.items():
            if "hostPath" in volume:
                self._host_path(volume["hostPath"])
            elif "emptyDir" in volume:
                self._directory(self.path(name), EMPTY_DIR_MODE)
            else:
                self._write(self.path(name), volume_files(self.pod, volume, self.objects, self.pod_ip), self._mode(volume))
                if token_projections(volume):
                    self.tokens_issued[name] = time.monotonic()

    def refresh_tokens(self, now: float | None = None) -> None:
        """Requests the projected service-account tokens past 80 % of their lifetime again and
        replaces their files (atomically: a reader sees the old token or the new one)."""
        now = time.monotonic() if now is None else now
        for name, issued in list(self.tokens_issued.items()):
            projections = token_projections(self.volumes[name])
            lifetime = min(int(p.get("expirationSeconds", DEFAULT_TOKEN_SECONDS)) for p in projections)
            if now - issued < TOKEN_REFRESH_FRACTION * lifetime:
                continue
            files: dict[str, bytes] = {}
            for projection in projections:
                files.update(token_file(self.pod, projection, self.objects))
            self._write(self.path(name), files, self._mode(self.volumes[name]))
            self.tokens_issued[name] = now

    @staticmethod
    def _mode(volume: Mapping) -> int:
        kind = next(k for k in volume if k != "name")
        return int((volume[kind] or {}).get("defaultMode", DEFAULT_FILE_MODE))

    def mounts(self, container: Mapping) -> list[Mount]:
        mounts = []
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in self.volumes:
                raise PodConfigError(f"container {container['name']}: volumeMount {mount['name']!r} names no volume of the pod")
            source = self.path(mount["name"])
            if mount.get("subPath"):
                source = source / mount["subPath"]
                if not source.resolve().is_relative_to(self.path(mount["name"]).resolve()):
                    raise PodConfigError(f"subPath {mount['subPath']!r} leaves volume {mount['name']}")
                if not source.exists():  # the kubelet creates a missing subPath as a directory
                    self._directory(source, EMPTY_DIR_MODE)
            mounts.append(Mount(source=str(source), target=mount["mountPath"], read_only=bool(mount.get("readOnly"))))
        return mounts

    def _directory(self, path: Path, mode: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self.fs_group is not None:
            # As the kubelet does for fsGroup: group-owned, group-writable, new files inherit the group.
            os.chown(path, -1, self.fs_group)
            mode |= 0o2070
        path.chmod(mode)

    def _write(self, directory: Path, files: Mapping[str, bytes], mode: int) -> None:
        self._directory(directory, 0o755)
        for relative, content in files.items():
            path = directory / relative
            if not path.resolve().is_relative_to(directory.resolve()):
                raise PodConfigError(f"volume item path {relative!r} leaves the volume")
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.with_name(f".{path.name}.new")
            staged.write_bytes(content)
            if self.fs_group is not None:
                os.chown(staged, -1, self.fs_group)
                mode |= (mode & 0o400) >> 3  # the group may read what the owner may
            staged.chmod(mode)
            os.replace(staged, path)  # tokens are rewritten while the pod runs

    @staticmethod
    def _host_path(source: Mapping) -> None:
        path, kind = Path(source["path"]), source.get("type", "")
        if kind == "DirectoryOrCreate" or (kind == "" and not path.exists()):
            path.mkdir(parents=True, exist_ok=True)
        elif kind == "FileOrCreate":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
        elif kind in _HOST_PATH_DIRECTORY and not path.is_dir():
            raise PodConfigError(f"hostPath type check failed: {path} is not a directory")
        elif kind in _HOST_PATH_FILE and not path.is_file():
            raise PodConfigError(f"hostPath type check failed: {path} is not a file")
        elif kind not in _HOST_PATH_DIRECTORY + _HOST_PATH_FILE:
            raise PodConfigError(f"hostPath type {kind!r} is not supported here (Directory, DirectoryOrCreate, File, FileOrCreate)")
