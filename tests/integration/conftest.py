"""Fixtures for integration tests that need pods to run: the project's node agent on the test cluster.

  node_agent (session)  ``controlplane.node_agent.NodeAgent`` (the test kubelet) serving nodes ``node-a`` and ``node-b``
                        (cpu 8, memory 32Gi, nvidia.com/gpu 2 each) on the ``control_plane``. Pods the
                        scheduler binds to them run as local processes; ``node_agent.pod(namespace,
                        name).log_path(container)`` is a container's log, ``.pids()`` its processes.
                        Every process it started is killed when the session ends.
"""

from __future__ import annotations

import pytest

from controlplane.node_agent import NodeAgent, NodeSpec

NODE_GPUS = 2
NODES = [NodeSpec(name="node-a", gpus=NODE_GPUS), NodeSpec(name="node-b", gpus=NODE_GPUS)]


@pytest.fixture(scope="session")
def node_agent(control_plane, tmp_path_factory: pytest.TempPathFactory):
    agent = NodeAgent(control_plane.kubeconfig, tmp_path_factory.mktemp("node-agent"), NODES,
                      backoff_base_s=0.5, backoff_max_s=5.0).start()
    yield agent
    agent.stop()
