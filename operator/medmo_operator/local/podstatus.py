"""A pod's phase and conditions from its containers' states, and when a container is restarted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .container import ContainerRun, now

RESTART_RESET_AFTER_S = 60.0  # a container that ran this long before failing starts its back-off afresh


@dataclass(frozen=True)
class RestartPolicy:
    """The pod's restartPolicy and the kubelet's exponential back-off between restarts."""

    policy: str = "Always"
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0

    def restarts(self, exit_code: int) -> bool:
        return self.policy == "Always" or (self.policy == "OnFailure" and exit_code != 0)

    def retries_init(self) -> bool:
        """Init containers are retried under both Always and OnFailure."""
        return self.policy != "Never"

    def delay_s(self, attempt: int) -> float:
        return min(self.backoff_base_s * 2 ** attempt, self.backoff_max_s)

    @staticmethod
    def next_attempt(attempt: int, ran_s: float) -> int:
        return 0 if ran_s > RESTART_RESET_AFTER_S else attempt + 1


class PodConditions:
    """The pod's conditions and phase as the API shows them (the caller holds the pod's lock)."""

    def __init__(self) -> None:
        self.started_at = now()
        self.set: dict[str, dict] = {}
        self._ready: dict[str, dict] = {}  # ContainersReady/Ready as last reported
        self.failure: tuple[str, str] | None = None  # (reason, message) that ends the pod as Failed

    def mark(self, kind: str, value: bool) -> None:
        self.set[kind] = {"type": kind, "status": str(value), "lastTransitionTime": now()}

    def conditions(self, phase: str, containers: Sequence[ContainerRun]) -> list[dict]:
        ready = phase == "Running" and all(c.ready for c in containers)
        conditions = dict(self.set)
        for kind in ("ContainersReady", "Ready"):
            previous = self._ready.get(kind)
            if previous is None or previous["status"] != str(ready):
                previous = {"type": kind, "status": str(ready), "lastTransitionTime": now()}
            self._ready[kind] = previous
            conditions[kind] = previous
        conditions.setdefault("Initialized", {"type": "Initialized", "status": "False", "lastTransitionTime": self.started_at})
        conditions["PodScheduled"] = {"type": "PodScheduled", "status": "True", "lastTransitionTime": self.started_at}
        return list(conditions.values())

    def phase(self, containers: Sequence[ContainerRun], restart_pending: bool) -> str:
        if self.failure:
            return "Failed"
        if "Initialized" not in self.set:
            return "Pending"
        states = [c.state for c in containers]
        if any("running" in s for s in states):
            return "Running"
        if all("terminated" in s for s in states) and not restart_pending:
            return "Succeeded" if all(s["terminated"]["exitCode"] == 0 for s in states) else "Failed"
        return "Running" if any(c.restart_count or c.terminated for c in containers) else "Pending"
