"""A pod's volumes as the kubelet makes them: modes, fsGroup ownership, subPaths, hostPath types."""

import stat

import pytest

from medmo_operator.local.podspec import PodConfigError, StaticObjects
from medmo_operator.local.volumes import PodVolumes


def _pod(volumes, fs_group=None):
    context = {} if fs_group is None else {"fsGroup": fs_group}
    return {"metadata": {"name": "p", "namespace": "ns"}, "spec": {"securityContext": context, "volumes": volumes,
                                                                   "containers": [{"name": "main"}]}}


def _objects():
    store = StaticObjects()
    store.add({"kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "ns"}, "data": {"a.yaml": "x: 1\n"}})
    return store


def test_empty_dirs_are_writable_by_any_user_and_owned_by_the_fs_group(tmp_path):
    volumes = PodVolumes(_pod([{"name": "cache", "emptyDir": {}}], fs_group=2000), tmp_path, _objects(), "")
    volumes.prepare()
    info = volumes.path("cache").stat()
    assert stat.S_IMODE(info.st_mode) & 0o777 == 0o777
    assert info.st_gid == 2000 and info.st_mode & stat.S_ISGID  # new files inherit the group


def test_config_files_take_the_default_mode_and_the_group_may_read_them(tmp_path):
    pod = _pod([{"name": "config", "configMap": {"name": "settings", "defaultMode": 0o400}}], fs_group=2000)
    volumes = PodVolumes(pod, tmp_path, _objects(), "")
    volumes.prepare()
    info = (volumes.path("config") / "a.yaml").stat()
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o440, 2000)


def test_mounts_bind_volumes_and_sub_paths_at_their_mount_paths(tmp_path):
    volumes = PodVolumes(_pod([{"name": "data", "emptyDir": {}}, {"name": "host", "hostPath": {"path": str(tmp_path / "h")}}]),
                         tmp_path / "volumes", _objects(), "")
    volumes.prepare()
    container = {"name": "main", "volumeMounts": [
        {"name": "data", "mountPath": "/data", "subPath": "models", "readOnly": True},
        {"name": "host", "mountPath": "/host"}]}
    data, host = volumes.mounts(container)
    assert (data.source, data.target, data.read_only) == (str(tmp_path / "volumes" / "data" / "models"), "/data", True)
    assert (tmp_path / "volumes" / "data" / "models").is_dir()  # a missing subPath is created
    assert (host.source, host.target, host.read_only) == (str(tmp_path / "h"), "/host", False)
    assert (tmp_path / "h").is_dir()  # hostPath without a type: created when missing
    with pytest.raises(PodConfigError, match="leaves volume data"):
        volumes.mounts({"name": "main", "volumeMounts": [{"name": "data", "mountPath": "/x", "subPath": "../../etc"}]})


def test_host_path_types_are_checked(tmp_path):
    (tmp_path / "file").write_text("")
    for source, message in (({"path": str(tmp_path / "file"), "type": "Directory"}, "is not a directory"),
                            ({"path": str(tmp_path), "type": "File"}, "is not a file"),
                            ({"path": str(tmp_path), "type": "Socket"}, "not supported")):
        with pytest.raises(PodConfigError, match=message):
            PodVolumes(_pod([{"name": "h", "hostPath": source}]), tmp_path / "v", _objects(), "").prepare()
