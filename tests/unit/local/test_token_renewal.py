"""Projected ServiceAccount tokens, as the kubelet keeps them: bound to the pod, and requested anew
once 80 % of their lifetime has passed (a long-running pod's in-cluster client never holds an expired one)."""

import time

from medmo_operator.local.podspec import StaticObjects
from medmo_operator.local.volumes import PodVolumes

LIFETIME_S = 600


class CountingTokens(StaticObjects):
    """An ObjectSource issuing token-1, token-2 ... and recording what each was bound to."""

    def __init__(self):
        super().__init__()
        self.requests: list[tuple] = []

    def service_account_token(self, namespace, service_account, audience, expiration_seconds, pod=None):
        self.requests.append((namespace, service_account, expiration_seconds, pod))
        return f"token-{len(self.requests)}"


def _pod() -> dict:
    projected = {"sources": [{"serviceAccountToken": {"path": "token", "expirationSeconds": LIFETIME_S}},
                             {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}
    return {"metadata": {"name": "op-0", "namespace": "ns", "uid": "u-1"},
            "spec": {"serviceAccountName": "op", "volumes": [{"name": "api", "projected": projected}], "containers": [{"name": "main"}]}}


def test_tokens_are_bound_to_the_pod_and_renewed_past_80_percent_of_their_lifetime(tmp_path):
    source = CountingTokens()
    volumes = PodVolumes(_pod(), tmp_path, source, "")
    volumes.prepare()
    token = volumes.path("api") / "token"
    issued = volumes.tokens_issued["api"]
    assert token.read_text() == "token-1"
    assert source.requests == [("ns", "op", LIFETIME_S, ("op-0", "u-1"))]

    volumes.refresh_tokens(now=issued + 0.7 * LIFETIME_S)
    assert token.read_text() == "token-1"

    volumes.refresh_tokens(now=issued + 0.81 * LIFETIME_S)
    assert token.read_text() == "token-2"
    assert (volumes.path("api") / "namespace").read_text() == "ns"
    assert sorted(p.name for p in volumes.path("api").iterdir()) == ["namespace", "token"]


def test_volumes_without_tokens_are_never_rewritten(tmp_path):
    source = CountingTokens()
    source.add({"kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ns"}, "data": {"a": "1"}})
    pod = _pod() | {"spec": {"volumes": [{"name": "c", "configMap": {"name": "c"}}], "containers": [{"name": "main"}]}}
    volumes = PodVolumes(pod, tmp_path, source, "")
    volumes.prepare()
    volumes.refresh_tokens(now=time.monotonic() + 10 * LIFETIME_S)
    assert volumes.tokens_issued == {} and source.requests == []
