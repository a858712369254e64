"""Cluster names in pods' hosts files: what a pod in one namespace resolves, and to which address."""

from medmo_operator.local.network import dns_records, render_hosts


def pod(name, namespace="ns", ip="127.20.0.2", labels=None, hostname=None, subdomain=None, phase="Running",
        deleting=False, ready=True):
    meta = {"name": name, "namespace": namespace, "labels": labels or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"hostname": hostname, "subdomain": subdomain},
            "status": {"podIP": ip, "phase": phase, "conditions": [{"type": "Ready", "status": str(ready)}]}}


def service(name, namespace="ns", selector=None, headless=True, publish_not_ready=False):
    return {"metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": selector or {}, "clusterIP": "None" if headless else "10.0.0.7",
                     "publishNotReadyAddresses": publish_not_ready}}


def as_map(records):
    resolved = {}
    for address, names in records:
        for name in names:
            resolved.setdefault(name, []).append(address)
    return resolved


def test_indexed_job_pods_resolve_as_hostname_dot_service():
    pods = [pod("job-0-x", ip="127.20.0.2", labels={"job": "j"}, hostname="job-0", subdomain="svc"),
            pod("job-1-y", ip="127.20.0.3", labels={"job": "j"}, hostname="job-1", subdomain="svc")]
    names = as_map(dns_records("ns", pods, [service("svc", selector={"job": "j"})]))
    assert names["job-0.svc"] == ["127.20.0.2"]
    assert names["job-1.svc.ns.svc.cluster.local"] == ["127.20.0.3"]
    assert sorted(names["svc"]) == ["127.20.0.2", "127.20.0.3"]
    assert sorted(names["svc.ns.svc"]) == ["127.20.0.2", "127.20.0.3"]


def test_other_namespaces_resolve_only_qualified_names():
    pods = [pod("a", namespace="other", labels={"app": "w"}, hostname="a", subdomain="svc")]
    names = as_map(dns_records("ns", pods, [service("svc", namespace="other", selector={"app": "w"})]))
    assert "svc" not in names and "a.svc" not in names
    assert names["svc.other"] == ["127.20.0.2"] and names["a.svc.other.svc.cluster.local"] == ["127.20.0.2"]


def test_pod_names_need_a_headless_service_of_the_subdomain():
    pods = [pod("a", hostname="a", subdomain="missing")]
    assert dns_records("ns", pods, [service("svc", selector={"app": "x"}, headless=False)]) == []


def test_finished_terminating_and_unaddressed_pods_do_not_resolve():
    pods = [pod("done", labels={"app": "w"}, phase="Succeeded"), pod("going", labels={"app": "w"}, deleting=True),
            pod("new", labels={"app": "w"}, ip=None), pod("up", labels={"app": "w"}, ip="127.20.0.9")]
    assert as_map(dns_records("ns", pods, [service("web", selector={"app": "w"})]))["web"] == ["127.20.0.9"]


def test_hosts_file_holds_localhost_the_pods_own_names_then_the_cluster():
    me = pod("job-0-x", hostname="job-0", subdomain="svc")
    text = render_hosts(me, "127.20.0.2", [("127.20.0.3", ["job-1.svc"])])
    lines = text.splitlines()
    assert lines[0] == "127.0.0.1 localhost"
    assert "127.20.0.2 job-0.svc.ns.svc.cluster.local job-0" in lines
    assert lines[-1] == "127.20.0.3 job-1.svc"


def test_not_ready_pods_resolve_only_where_the_service_publishes_them():
    pods = [pod("warming", labels={"app": "w"}, hostname="warming", subdomain="svc", ready=False, ip="127.20.0.4"),
            pod("serving", labels={"app": "w"}, ip="127.20.0.5")]
    names = as_map(dns_records("ns", pods, [service("svc", selector={"app": "w"})]))
    assert names["svc"] == ["127.20.0.5"] and "warming.svc" not in names
    names = as_map(dns_records("ns", pods, [service("svc", selector={"app": "w"}, publish_not_ready=True)]))
    assert sorted(names["svc"]) == ["127.20.0.4", "127.20.0.5"] and names["warming.svc"] == ["127.20.0.4"]
