"""Hosts on one machine: a Linux network namespace per host, each joined by a veth pair to a bridge in a hub
namespace of its own, and one veth from the test's (root) namespace to the hub, so the test reaches every
host.  Only the lab's own namespaces, interfaces and a private /24 are created; ``cut`` takes a host's link
down (a partition: packets are dropped, no reset), ``heal`` brings it back.  Needs root (CAP_NET_ADMIN)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    probe = f"mgpuprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (OSError, subprocess.SubprocessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        return f"cannot create a network namespace ({exc}: {err.decode(errors='replace').strip()})"
    _ip("netns", "del", probe)
    return None


@dataclass
class NetLab:
    hosts: list[str]
    tag: str = field(default_factory=lambda: f"m{os.getpid() % 100000}")
    net: str = field(default_factory=lambda: f"10.213.{os.getpid() % 200 + 20}")
    made: list[str] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def ip(self, host: str) -> str:
        return f"{self.net}.{self.hosts.index(host) + 2}"

    @property
    def root_ip(self) -> str:
        return f"{self.net}.1"

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def _hub_end(self, i: int) -> str:
        return f"{self.tag}h{i}"

    def up(self) -> NetLab:
        try:
            return self._up()
        except BaseException:
            self.down()  # nothing of a half-built lab stays behind
            raise

    def _up(self) -> NetLab:
        hub = self.ns("hub")
        _ip("netns", "add", hub)
        self.made.append(hub)
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for i, host in enumerate(["(root)", *self.hosts], start=1):
            a, b = f"{self.tag}a{i}", self._hub_end(i)
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", b, "netns", hub)
            _ip("-n", hub, "link", "set", b, "master", "br0")
            _ip("-n", hub, "link", "set", b, "up")
            if i == 1:  # the test's own end stays in the root namespace
                self.made.append(f"link:{a}")
                _ip("addr", "add", f"{self.root_ip}/24", "dev", a)
                _ip("link", "set", a, "up")
                continue
            ns = self.ns(host)
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("link", "set", a, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", a)
            _ip("-n", ns, "link", "set", a, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def cut(self, host: str) -> None:
        _ip("-n", self.ns("hub"), "link", "set", self._hub_end(self.hosts.index(host) + 2), "down")

    def heal(self, host: str) -> None:
        _ip("-n", self.ns("hub"), "link", "set", self._hub_end(self.hosts.index(host) + 2), "up")

    def down(self) -> None:
        for m in reversed(self.made):
            try:
                if m.startswith("link:"):
                    _ip("link", "del", m[5:])
                else:
                    _ip("netns", "del", m)
            except subprocess.SubprocessError:
                pass
        self.made.clear()
