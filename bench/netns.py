"""Network namespaces that give Ray nodes on this machine their own addresses, so one can be cut
off by the network while its processes live on (a partition, not a crash).

``TestNet`` makes a bridge with the host's address in a private test subnet, then one namespace
per node with a veth pair whose outer end joins the bridge::

    host (bridge bi<tag>, 10.<a>.<b>.1/24) ── veth ── netns bi<tag>-n2 (10.<a>.<b>.2, lo up)
                                           └─ veth ── netns bi<tag>-n3 (10.<a>.<b>.3)

A namespace's default route goes through the bridge, so its node reaches the head and every
other node at the bridge's address, and they reach it at its own. ``cut`` sets the node's
outer veth down, ``heal`` up again. Only the links, namespaces and addresses made here are
ever touched; ``close`` removes all of them (a namespace's processes must be stopped first, or
its veth goes with it anyway when the namespace is deleted). Needs root (``ip`` from iproute2).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def used_subnets() -> set[str]:
    """The ``a.b`` of every 10.a.b.0/24 an interface of this machine has an address in."""
    out = _ip("-o", "-4", "addr", "show").stdout
    found = set()
    for line in out.splitlines():
        address = line.split()[3]
        if address.startswith("10."):
            found.add(".".join(address.split(".")[1:3]))
    return found


@dataclass
class TestNet:
    """A bridge and namespaces named ``bi<tag>...`` in 10.<a>.<b>.0/24 (a context manager)."""

    tag: str = field(default_factory=lambda: os.urandom(3).hex())
    subnet: str = ""  # "a.b"; empty: the first of 10.77.0-255 no interface uses
    namespaces: list[str] = field(default_factory=list)
    _bridge_made: bool = False

    __test__ = False  # not a pytest class

    def __post_init__(self) -> None:
        if not self.subnet:
            taken = used_subnets()
            self.subnet = next(f"77.{b}" for b in range(256) if f"77.{b}" not in taken)

    @property
    def bridge(self) -> str:
        return f"bi{self.tag}"

    @property
    def host_ip(self) -> str:
        """The host's address on the bridge: the cluster's ``node_ip`` and the S3 server's."""
        return f"10.{self.subnet}.1"

    def __enter__(self) -> TestNet:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._bridge_made = True
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self) -> tuple[str, str]:
        """A new namespace joined to the bridge: its name and its address."""
        n = len(self.namespaces) + 2
        name, outer, inner = f"bi{self.tag}-n{n}", f"bi{self.tag}o{n}", f"bi{self.tag}i{n}"
        address = f"10.{self.subnet}.{n}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", name)
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")
        _ip("-n", name, "addr", "add", f"{address}/24", "dev", inner)
        _ip("-n", name, "link", "set", inner, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "route", "add", "default", "via", self.host_ip)
        return name, address

    def cut(self, name: str) -> None:
        """Cut namespace ``name`` off: its outer veth down, nothing in or out."""
        _ip("link", "set", self._outer(name), "down")

    def heal(self, name: str) -> None:
        _ip("link", "set", self._outer(name), "up")

    def close(self) -> None:
        """Remove every veth, namespace and the bridge made here."""
        for name in self.namespaces:
            _ip("link", "delete", self._outer(name), check=False)  # a held namespace keeps it
            _ip("netns", "delete", name, check=False)
        self.namespaces.clear()
        if self._bridge_made:
            _ip("link", "delete", self.bridge, check=False)
            self._bridge_made = False

    def _outer(self, name: str) -> str:
        return f"bi{self.tag}o{name.rsplit('-n', 1)[1]}"
