"""The local backend: runs pods as confined processes on this machine, without an API server.

``PodRunner`` runs pod specs (as the operator renders them) as local processes; ``medmo run``
drives it. (The test kubelet that serves a real API server with it lives in tests/controlplane.)
"""

from .podspec import StaticObjects
from .runner import PodRunner, RunningPod

__all__ = ["PodRunner", "RunningPod", "StaticObjects"]
