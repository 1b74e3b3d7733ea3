"""The local multi-node cluster: separate nodes, loopback only, token auth enforced."""

from __future__ import annotations

import ipaddress
import urllib.error
import urllib.request

import psutil
import pytest

from prunetune.cluster import processes
from prunetune.cluster.local import ClusterExists, LocalCluster
from prunetune.search.cli import main

pytestmark = pytest.mark.slow


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def test_nodes_are_separate_raylets_on_loopback(local_cluster):
    nodes = {n["node_name"]: n for n in local_cluster.ray_nodes() if n["state"] == "ALIVE"}
    live = ["head"] + [n.name for n in local_cluster.worker_nodes if not n.killed]   # earlier tests kill/add
    assert sorted(nodes) == sorted(live) and len(live) == 3
    assert len({n["node_id"] for n in nodes.values()}) == 3
    assert all(_loopback(n["node_ip"]) for n in nodes.values())
    assert nodes["head"]["is_head_node"] and "CPU" not in nodes["head"]["resources_total"]
    assert [nodes[w]["resources_total"]["CPU"] for w in live[1:]] == [1, 1]
    # each node its own ports and temp dir
    ports = [p for n in local_cluster.nodes for p in n.ports.values()]
    assert len(ports) == len(set(ports))
    assert len({n.temp_dir for n in local_cluster.nodes}) == len(local_cluster.nodes)


def test_every_listening_socket_is_on_loopback(local_cluster):
    listening = []
    for p in processes.members(n.leader for n in local_cluster.nodes):
        try:
            listening += [(p.name(), c.laddr) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    assert len(listening) >= 10  # GCS, raylets, object managers, agents, dashboard ...
    exposed = [(name, f"{a.ip}:{a.port}") for name, a in listening if not _loopback(a.ip)]
    assert not exposed, f"listening beyond loopback: {exposed}"
    dash = [a for _, a in listening if a.port == local_cluster.dashboard_port]
    assert dash and all(a.ip == "127.0.0.1" for a in dash)


def _get(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_jobs_api_needs_the_token(local_cluster):
    url = local_cluster.dashboard_url + "/api/jobs/"
    token = local_cluster.token_file.read_text().strip()
    assert _get(url, None) == 401
    assert _get(url, "not-the-token") == 403
    assert _get(url, token) == 200
    assert oct(local_cluster.token_file.stat().st_mode & 0o777) == "0o600"


def test_gcs_needs_the_token(local_cluster):
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    token = local_cluster.token_file.read_text().strip()
    with grpc.insecure_channel(local_cluster.address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        for metadata in (None, [("authorization", "Bearer not-the-token")]):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10,
                                    metadata=[("authorization", f"Bearer {token}")])
        assert len(reply.node_info_list) >= 3


def test_second_up_on_a_running_cluster_is_refused(local_cluster, capsys):
    with pytest.raises(ClusterExists, match="still running"):
        LocalCluster(1, state_dir=local_cluster.state_dir).up()
    assert main(["cluster", "up", "--workers", "1", "--state-dir", str(local_cluster.state_dir)]) == 2
    assert "cluster down" in capsys.readouterr().out
    assert local_cluster.state_file.is_file() and local_cluster.token_file.is_file()  # untouched
    assert all(r["process_alive"] and r["ray_alive"] for r in local_cluster.status() if not r["killed"])


@pytest.mark.parametrize("argv, key", [
    (["--workers", "0"], "--workers"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker"),
    (["--resources", "{not json"], "--resources"),
    (["--resources", '{"CPU": 2}'], "CPU"),
])
def test_bad_up_arguments_exit_2(tmp_path, capsys, argv, key):
    assert main(["cluster", "up", "--state-dir", str(tmp_path / "s"), *argv]) == 2
    assert key in capsys.readouterr().out
    assert not (tmp_path / "s").exists()


def test_kill_worker_loses_the_node_and_add_worker_replaces_it(local_cluster):
    """It changes the (session's) cluster, and leaves it with as many live workers as before."""
    names = [n.name for n in local_cluster.nodes]
    live = [n.name for n in local_cluster.worker_nodes if not n.killed]
    lost = local_cluster.kill_worker(0)
    assert lost.name == live[0]
    assert not processes.members([lost.leader])  # every process of that node, Ray workers included
    killed = {r["name"]: r["killed"] for r in local_cluster.status()}
    assert killed[lost.name] and not killed["head"] and not any(killed[n] for n in live[1:])
    new = local_cluster.add_worker()
    assert new.name == f"worker-{len(names) - 1}" and new.name in local_cluster.node_ids()
    reloaded = LocalCluster.load(local_cluster.state_dir)  # what `cluster down` would stop
    assert [n.name for n in reloaded.nodes] == [*names, new.name]
