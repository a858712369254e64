"""Several operator replicas, one acting: kopf peering, and which replica the progress Service reaches.

Every replica started with ``medmo operator --peering NAME`` keeps itself alive in the
ClusterKopfPeering ``NAME`` (kopf's keep-alives), and kopf pauses every replica but the one of highest
priority among the live ones. The priority is the start time, negated: the oldest live replica acts,
so a replica that starts later (a restart, a rollout) waits as standby instead of taking over.

Progress reports live in the acting replica's memory, so only it may receive them: it labels its own
pod ``medmo.io/acting=true``, and the production overlay's Service selects that label. Whether this
replica acts is read from the same keep-alives, with kopf's rule (:func:`is_acting`).
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)

PEERING_GROUP, PEERING_VERSION, PEERING_PLURAL = "kopf.dev", "v1", "clusterkopfpeerings"
ACTING_LABEL = "medmo.io/acting"
CHECK_INTERVAL_S = 2.0


def start_priority() -> int:
    """This replica's kopf priority: higher for an earlier start (milliseconds since the epoch, negated)."""
    return -time.time_ns() // 1_000_000


def is_acting(peers: Mapping[str, Mapping[str, Any]], identity: str, priority: int, now: datetime) -> bool:
    """Whether kopf lets ``identity`` act, from the peering object's ``status`` (identity -> keep-alive).

    kopf pauses a replica while any other live peer has a priority at least as high (an equal one
    pauses both); a peer is live until ``lastseen + lifetime``.
    """
    for other, alive in peers.items():
        if other == identity or not isinstance(alive, Mapping):
            continue
        seen = datetime.fromisoformat(str(alive.get("lastseen")))
        seen = seen if seen.tzinfo else seen.replace(tzinfo=UTC)
        if seen + timedelta(seconds=int(alive.get("lifetime", 60))) > now and int(alive.get("priority", 0)) >= priority:
            return False
    return True


@dataclass(frozen=True)
class Peering:
    """How this replica takes part in peering (``medmo operator --peering``)."""

    name: str
    """The ClusterKopfPeering every replica keeps itself alive in."""
    identity: str
    """This replica in the keep-alives: its pod's name (kopf's POD_ID), else a name of its own."""
    priority: int
    lifetime_s: int
    """A replica that sent no keep-alive for this long is dead: the next one takes over."""
    pod: str | None
    """This replica's pod (labelled while it acts), or None outside a cluster."""

    @classmethod
    def start(cls, name: str, lifetime_s: int) -> Peering:
        pod = os.environ.get("POD_ID")
        identity = pod or f"{getpass.getuser()}@{socket.gethostname()}/{os.getpid()}"
        return cls(name=name, identity=identity, priority=start_priority(), lifetime_s=lifetime_s, pod=pod)

    def ensure_object(self) -> None:
        """Creates the peering object if no replica has yet (kopf only patches it)."""
        body = {"apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}", "kind": "ClusterKopfPeering",
                "metadata": {"name": self.name}}
        try:
            kubernetes.client.CustomObjectsApi().create_cluster_custom_object(PEERING_GROUP, PEERING_VERSION,
                                                                              PEERING_PLURAL, body)
        except ApiException as error:
            if error.status != 409:
                raise

    async def label_while_acting(self, namespace: str) -> None:
        """Keeps this replica's pod labelled ``medmo.io/acting=true`` exactly while kopf lets it act
        (checked every few seconds; runs until cancelled)."""
        if self.pod is None:
            return
        acting: bool | None = None
        while True:
            try:
                obj = await asyncio.to_thread(kubernetes.client.CustomObjectsApi().get_cluster_custom_object,
                                              PEERING_GROUP, PEERING_VERSION, PEERING_PLURAL, self.name)
                now_acting = is_acting(obj.get("status") or {}, self.identity, self.priority, datetime.now(UTC))
                if now_acting != acting:
                    labels = {ACTING_LABEL: "true" if now_acting else None}
                    await asyncio.to_thread(kubernetes.client.CoreV1Api().patch_namespaced_pod,
                                            self.pod, namespace, {"metadata": {"labels": labels}})
                    log.info("this replica (%s) %s", self.identity, "acts" if now_acting else "is on standby")
                    acting = now_acting
            except (ApiException, OSError) as error:  # the next check retries
                log.warning("checking peering %s: %s", self.name, error)
            await asyncio.sleep(CHECK_INTERVAL_S)
