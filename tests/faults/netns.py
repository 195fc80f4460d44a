"""Hosts as Linux network namespaces on one test-made bridge, and links the tests cut and restore.

Each host is a namespace with one veth pair: ``eth0`` inside, the other end enslaved to a
bridge in the root namespace that also carries an address, so the test process reaches
every host. Everything is named after a random tag and addressed in a /24 of 10.231.0.0/16
that no interface on the machine uses: several runs (and other suites) never collide, and
nothing outside the namespaces the test made is ever addressed. Cutting a host sets its
bridge-side veth down: its packets are dropped silently (no refusal, no reset), as when a
switch port or a cable fails, until the link is set up again.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.conftest import missing_service


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


@dataclass
class Host:
    name: str
    netns: str
    address: str
    #: the bridge-side end of the host's veth pair (in the root namespace)
    veth: str

    def argv(self, *argv: str) -> list[str]:
        """``argv`` run on this host: inside its namespace, under its own host name (a UTS namespace),
        so processes tell the hosts apart as on separate machines (worker ids, scheduler holders)."""
        named = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', self.name]
        return ["ip", "netns", "exec", self.netns, *named, *argv]

    def cut(self) -> None:
        _ip("link", "set", self.veth, "down")

    def restore(self) -> None:
        _ip("link", "set", self.veth, "up")


@dataclass
class Network:
    tag: str
    prefix: str
    bridge: str
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def gateway_address(self) -> str:
        """The root namespace's address on the bridge: where the test process talks from."""
        return f"{self.prefix}.254"

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        host = Host(
            name=name,
            netns=f"dsp{self.tag}-{name}",
            address=f"{self.prefix}.{index + 1}",
            veth=f"dsp{self.tag}v{index}",
        )
        self.hosts[name] = host  # before creating anything: teardown removes what exists of it
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("link", "set", host.veth, "master", self.bridge)
        _ip("link", "set", host.veth, "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        return host

    def teardown(self) -> None:
        for host in self.hosts.values():
            _ip("link", "del", host.veth, check=False)  # removes the namespace's end with it
            _ip("netns", "del", host.netns, check=False)
        _ip("link", "del", self.bridge, check=False)


def _free_prefix() -> str:
    used = _ip("-4", "addr", "show").stdout + _ip("-4", "route", "show", "table", "all").stdout
    candidates = [f"10.231.{n}" for n in range(1, 255) if f"10.231.{n}." not in used]
    if not candidates:
        missing_service("no free /24 in 10.231.0.0/16 for the test network")
    return random.choice(candidates)


def namespaces_unavailable() -> str | None:
    """Why this machine cannot host the test's network (None when it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if shutil.which("unshare") is None:
        return "the unshare command (util-linux) is not installed"
    probe = f"dspprobe-{uuid.uuid4().hex[:6]}"
    done = _ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"ip netns add is not permitted here: {done.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@contextlib.contextmanager
def network(*names: str) -> Iterator[Network]:
    """A bridge and one namespace per name, removed afterwards whatever happened."""
    why = namespaces_unavailable()
    if why:
        missing_service(why)
    tag = uuid.uuid4().hex[:5]
    net = Network(tag=tag, prefix=_free_prefix(), bridge=f"dsp{tag}br")
    try:
        _ip("link", "add", net.bridge, "type", "bridge")
        _ip("addr", "add", f"{net.gateway_address}/24", "dev", net.bridge)
        _ip("link", "set", net.bridge, "up")
        for name in names:
            net.add_host(name)
        yield net
    finally:
        net.teardown()
