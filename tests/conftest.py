"""Fixtures that start real servers for integration tests (nothing here is a mock).

A server starts only when a test asks for its fixture (directly or through another fixture),
once per session; unit tests that ask for none start nothing.

Kubernetes (etcd, kube-apiserver, kube-controller-manager, kube-scheduler on 127.0.0.1):
  k8s_bin_dir    (session)  directory with etcd, kube-apiserver, kube-controller-manager,
                            kube-scheduler and kubectl (for a test that starts its own ControlPlane).
  control_plane  (session)  ``controlplane.harness.ControlPlane``: ``kubeconfig`` (Path), ``server``
                            (URL), ``bin_dir``, ``pids``, ``kubectl(*args, check=True, input=None)
                            -> CompletedProcess`` (text; a failure raises with kubectl's stderr).
                            Binaries come from k8s_bin_dir: $MEDMO_K8S_BIN, else tests/controlplane/build.sh,
                            which builds them once (a cold build takes long: scripts/test.sh runs it
                            before pytest). While it is up, $KUBECONFIG points at it, so code that
                            loads the default kubeconfig (kopf, kubernetes.config) can only reach it,
                            and $KUBECACHEDIR at a kubectl cache of its own.
                            There are no nodes: pods stay Pending unless a test runs the node agent.
                            Component logs: <control_plane.workdir>/logs/*.log.
  kubeconfig     (session)  Path of the admin kubeconfig (user in system:masters, certificates
                            inlined); kubectl, kopf and the kubernetes client all accept it.
  k8s_api        (session)  ``kubernetes.client.ApiClient`` for it, e.g. ``CoreV1Api(k8s_api)``.
  namespace      (function) name of a fresh namespace whose ``default`` ServiceAccount exists
                            (so pods can be created at once); deleted after the test.

A stand-in for the Hugging Face Hub (tests/hub_standin.py: no hub is reachable here):
  hub            (session)  ``hub_standin.HubStandIn`` on 127.0.0.1 (``endpoint`` for HF_ENDPOINT,
                            ``token``, ``requests()``), serving the tiny preset exported in bf16
                            with its processor as HUB_MODEL, and again as HUB_GATED_MODEL, which
                            needs ``token``; any other id is a missing model (404).

S3 (SeaweedFS ``weed mini`` on 127.0.0.1; requests must be signed with the credentials):
  s3_server      (session)  ``controlplane.seaweed.SeaweedFS``: ``endpoint``, ``access_key``,
                            ``secret_key``, ``region``, ``storage_options()`` (kwargs for s3fs /
                            fsspec), ``env()`` (AWS_* variables for subprocesses).
  s3_bucket      (function) ``"s3://<bucket>"``, a new empty bucket, removed after the test.

Tests that use these fixtures get the markers ``controlplane`` / ``s3`` automatically. To run
without any server: ``pytest -m "not controlplane and not s3"``, or ``pytest --no-servers``.
Tests marked ``gpu`` are skipped, with the reason in the summary, unless a CUDA GPU and vLLM are
present (scripts/gpu-check.sh runs them on a GPU machine).
At the end of the session, any process the fixtures started that is still running is killed and
the session fails.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import time
from pathlib import Path

import pytest
from controlplane.harness import ControlPlane
from controlplane.processes import still_running
from controlplane.seaweed import SeaweedFS

BUILD_SCRIPT = Path(__file__).parent / "controlplane" / "build.sh"
SERVER_FIXTURE_MARKERS = {"k8s_bin_dir": "controlplane", "s3_server": "s3"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-servers", action="store_true",
                     help="deselect tests that need the Kubernetes control plane or SeaweedFS")


@pytest.hookimpl(tryfirst=True)  # markers must exist before -m deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_servers = []
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        for fixture, marker in SERVER_FIXTURE_MARKERS.items():
            if fixture in fixtures:
                item.add_marker(marker)
                needs_servers.append(item)
    if not gpu_and_vllm_present():
        skip = pytest.mark.skip(reason="needs a CUDA GPU and vLLM (the rollout-vllm image; scripts/gpu-check.sh runs it)")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)
    if config.getoption("--no-servers"):
        deselected = set(needs_servers)
        config.hook.pytest_deselected(items=[i for i in items if i in deselected])
        items[:] = [i for i in items if i not in deselected]


def gpu_and_vllm_present() -> bool:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:  # checked first: importing torch costs seconds
        return False
    import torch

    return torch.cuda.is_available()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leftovers = still_running()
    if not leftovers:
        return
    names = ", ".join(f"{p.name} (pid {p.pid})" for p in leftovers)
    for proc in leftovers:
        proc.stop(grace_s=5)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")
        reporter.write_line(f"ERROR: test servers were still running at the end of the session: {names}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def k8s_bin_dir() -> Path:
    from_env = os.environ.get("MEDMO_K8S_BIN")
    if from_env:
        return Path(from_env)
    # stdout is only the bin dir; the build's progress goes to stderr.
    result = subprocess.run([str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True)
    return Path(result.stdout.strip())


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory, k8s_bin_dir: Path):
    plane = ControlPlane(tmp_path_factory.mktemp("controlplane"), k8s_bin_dir).start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBECONFIG", str(plane.kubeconfig))
        # kubectl keys its discovery cache by host:port, and ports recur across sessions' clusters.
        patch.setenv("KUBECACHEDIR", str(plane.workdir / "kubectl-cache"))
        yield plane
    plane.stop()


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def k8s_api(kubeconfig: Path):
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(kubeconfig))
    yield api
    api.close()


def _namespace_name(test_name: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:48].rstrip("-")
    return f"{stem or 't'}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, k8s_api) -> str:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(k8s_api)
    name = _namespace_name(request.node.name)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    deadline = time.monotonic() + 60
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except ApiException as error:
            if error.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as error:
        if error.status != 404:
            raise


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: SeaweedFS) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    bucket = f"t-{secrets.token_hex(6)}"
    fs.mkdir(bucket)
    yield f"s3://{bucket}"
    fs.rm(bucket, recursive=True)


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory):
    import shutil

    import torch
    from hub_standin import HUB_GATED_MODEL, HUB_MODEL, HubStandIn

    from medmo_trainer.model import export_hf
    from medmo_trainer.model.presets import build_preset

    server = HubStandIn(tmp_path_factory.mktemp("hub"), gated=[HUB_GATED_MODEL], token=f"hf_{secrets.token_hex(16)}")
    # Saved in bf16, as released checkpoints are, so loading shows whether a stage's precision is honoured.
    model, processor, _ = build_preset("tiny-qwen3-vl", dtype=torch.bfloat16)
    export_hf(model, processor, str(server.root / HUB_MODEL))
    shutil.copytree(server.root / HUB_MODEL, server.root / HUB_GATED_MODEL)
    server.start()
    yield server
    server.stop()
