"""A real TLS SuperLink with SuperNode authentication on loopback (Flower 1.41).

Checks what the deployment guide promises: a SuperNode whose public key was registered with
``flwr supernode register`` comes online; one with an unregistered key is refused; one that
does not trust the SuperLink's CA cannot connect; every process is stopped afterwards.
"""

from __future__ import annotations

import time

from flwr_ext.deploy import LocalCluster, ManagedProcess, free_port, generate_node_keys
from flwr_ext.deploy.local import _bin


def _supernode_args(cluster: LocalCluster, key, *tls: str) -> list[str]:
    return [
        _bin("flower-supernode"),
        *tls,
        "--superlink",
        cluster.address,
        "--auth-supernode-private-key",
        str(key),
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--max-retries",
        "2",
        "--max-wait-time",
        "30",
    ]


def _wait_exit(procs: list[ManagedProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.alive for p in procs):
        time.sleep(0.5)


def _wait_online(cluster: LocalCluster, node_id: int, timeout: float) -> list[dict]:
    """Poll the SuperLink's node list (``flwr supernode list``) until ``node_id`` is online."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = cluster.list_supernodes()
        if any(int(n["node-id"]) == node_id and n["status"] == "online" for n in nodes):
            return nodes
        assert time.monotonic() < deadline, f"node {node_id} not online: {nodes}"
        time.sleep(2.0)


def test_registered_node_online_others_refused(tmp_path):
    cluster = LocalCluster(tmp_path)
    extra: list[ManagedProcess] = []
    try:
        cluster.start_superlink()
        good = cluster.add_supernode({"partition-id": 0, "num-partitions": 1})
        assert good.node_id is not None

        rogue_keys = generate_node_keys(tmp_path / "keys", "rogue")
        ca = ["--root-certificates", str(cluster.tls.ca_cert)]
        rogue = ManagedProcess(
            "rogue",
            _supernode_args(cluster, rogue_keys.private_key, *ca),
            tmp_path / "logs" / "rogue.log",
            env=cluster._env(tmp_path / "rogue-home"),
        )
        # right key, but trusts only the system CAs, not ours
        untrusting = ManagedProcess(
            "untrusting",
            _supernode_args(cluster, good.keys.private_key),
            tmp_path / "logs" / "untrusting.log",
            env=cluster._env(tmp_path / "untrusting-home"),
        )
        extra = [rogue, untrusting]
        # state, not log text: the registered node is online in the SuperLink's node list; the
        # two others give up (their retries, 2 x <= 30 s, bound this; margin for a loaded
        # machine) with a failure exit status, and never appear in the list. Their log tails
        # are only printed on failure (Flower's wording is not part of the contract). Each
        # differs from the online node in one thing only: rogue in its key, untrusting in
        # the CA it trusts.
        _wait_online(cluster, good.node_id, 120)
        _wait_exit(extra, 240)

        assert rogue.returncode not in (None, 0), rogue.tail()
        assert untrusting.returncode not in (None, 0), untrusting.tail()

        nodes = _wait_online(cluster, good.node_id, 60)
        assert [int(n["node-id"]) for n in nodes] == [good.node_id], nodes
        assert good.proc.alive
    finally:
        for proc in extra:
            proc.stop(grace=2)
        cluster.stop_all()
    assert not cluster.leftovers()
    assert all(not p.tree() for p in extra)
