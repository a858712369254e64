"""The local backend: runs pods as processes on this machine, with or without an API server.

``PodRunner`` runs pod specs (as the operator renders them) as local processes; ``NodeAgent``
registers Nodes with an API server and runs the pods bound to them with a ``PodRunner``.
"""

from .node_agent import NodeAgent, NodeSpec
from .podspec import StaticObjects
from .runner import PodRunner, RunningPod

__all__ = ["NodeAgent", "NodeSpec", "PodRunner", "RunningPod", "StaticObjects"]
