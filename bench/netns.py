"""Links shaped like home connections, for benchmarks that need a slow or broken network on one machine.

Each process of a benchmark runs in a network namespace of its own, joined by a veth pair to a bridge in
the root namespace; a tbf qdisc on both ends of every veth limits what the process sends and receives.
``Netns.cut``/``restore`` take one process's link down and up again (its TCP connections survive, their
packets are lost meanwhile), the way a home router's reconnect looks. Needs root (CAP_NET_ADMIN).

A ``NetPlan`` names what one benchmark creates (namespace and link name prefixes, a private subnet), so
that ``cleanup_network`` removes exactly that benchmark's leftovers, also those of a killed earlier run.
Used by bench/compression.py (boundary traffic on slow links) and bench/join.py (a newcomer's download).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import subprocess
import sys


@dataclasses.dataclass(frozen=True)
class NetPlan:
    ns_prefix: str
    """Network namespaces; stale ones with this prefix are removed at start."""
    link_prefix: str
    """Bridge and veth names (Linux allows at most 15 characters in all)."""
    subnet: str
    """Used only inside the namespaces created here; must not overlap an address of this machine."""

    @property
    def bridge(self) -> str:
        return f"{self.link_prefix}-br0"


class NetSetupError(RuntimeError):
    def __init__(self, command: list[str], returncode: int | None, stderr: str):
        super().__init__(f"{' '.join(command)} failed ({returncode}): {stderr.strip()}")
        self.command, self.returncode, self.stderr = command, returncode, stderr

    def to_json(self) -> dict:
        return {"command": " ".join(self.command), "returncode": self.returncode, "stderr": self.stderr.strip()}


def sh(*command: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise NetSetupError(list(command), None, str(e)) from None
    except subprocess.TimeoutExpired:
        raise NetSetupError(list(command), None, f"timed out after {timeout}s") from None
    if check and done.returncode != 0:
        raise NetSetupError(list(command), done.returncode, done.stderr or done.stdout)
    return done


def list_namespaces() -> list[str]:
    done = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def list_links() -> list[str]:
    done = sh("ip", "-o", "link", "show", check=False)
    names = []
    for line in done.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@")[0])
    return names


def cleanup_network(plan: NetPlan) -> dict:
    """Remove the namespaces and links of ``plan`` (by their name prefixes); report what is left."""
    for ns in list_namespaces():
        if ns.startswith(plan.ns_prefix):
            sh("ip", "netns", "del", ns, check=False)
    for link in list_links():
        if link.startswith(plan.link_prefix):
            sh("ip", "link", "del", link, check=False)
    return {
        "namespaces_left": [ns for ns in list_namespaces() if ns.startswith(plan.ns_prefix)],
        "links_left": [link for link in list_links() if link.startswith(plan.link_prefix)],
    }


def check_subnet_unused(subnet_text: str) -> None:
    subnet = ipaddress.ip_network(subnet_text)
    done = sh("ip", "-4", "-o", "addr", "show", check=False)
    for match in re.finditer(r"inet (\S+)", done.stdout):
        if ipaddress.ip_interface(match.group(1)).network.overlaps(subnet):
            raise NetSetupError(["(check)", subnet_text], None, f"{subnet_text} overlaps an address of this machine: {match.group(1)}")


class Netns:
    """One namespace per process, each with a veth to a bridge in the root namespace; tbf on both ends."""

    def __init__(self, names: list[str], delay_ms: float, plan: NetPlan):
        self.names, self.delay_ms, self.plan = names, delay_ms, plan
        hosts = list(ipaddress.ip_network(plan.subnet).hosts())
        self.ns = {name: f"{plan.ns_prefix}{i}-{re.sub(r'[^a-z0-9]', '', name.lower())}" for i, name in enumerate(names)}
        self.ip = {name: str(hosts[9 + i]) for i, name in enumerate(names)}
        self.veth = {name: (f"{plan.link_prefix}{i}h", f"{plan.link_prefix}{i}n") for i, name in enumerate(names)}
        self.commands: list[str] = []
        self.notes: list[str] = []
        self.netem_error: dict | None = None
        self.netem_active = False
        self.shaped = False

    def run(self, *command: str) -> None:
        self.commands.append(" ".join(command))
        sh(*command)

    def _ends(self):
        """(command prefix, device) of both ends of every veth: the namespace's end shapes what it sends
        (its upload), the bridge's end what it receives (its download)."""
        for name in self.names:
            host_end, ns_end = self.veth[name]
            yield ["ip", "netns", "exec", self.ns[name]], ns_end
            yield [], host_end

    def up(self) -> None:
        check_subnet_unused(self.plan.subnet)
        bridge = self.plan.bridge
        self.run("ip", "link", "add", bridge, "type", "bridge")
        self.run("ip", "link", "set", bridge, "up")
        prefix_len = ipaddress.ip_network(self.plan.subnet).prefixlen
        for name in self.names:
            ns, (host_end, ns_end) = self.ns[name], self.veth[name]
            self.run("ip", "netns", "add", ns)
            self.run("ip", "-n", ns, "link", "set", "lo", "up")
            self.run("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            self.run("ip", "link", "set", ns_end, "netns", ns)
            self.run("ip", "link", "set", host_end, "master", bridge)
            self.run("ip", "link", "set", host_end, "up")
            self.run("ip", "-n", ns, "addr", "add", f"{self.ip[name]}/{prefix_len}", "dev", ns_end)
            self.run("ip", "-n", ns, "link", "set", ns_end, "up")

    def shape(self, mbit: float) -> None:
        """Put (or change) a tbf of ``mbit`` on both ends of every veth; under a netem delay if asked and possible."""
        tbf = ["tbf", "rate", f"{mbit:g}mbit", "burst", "64kb", "latency", "50ms"]
        for prefix, dev in self._ends():
            if not self.shaped and self.delay_ms > 0 and self.netem_error is None:
                try:
                    self.run(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", f"{self.delay_ms:g}ms")
                    self.netem_active = True
                except NetSetupError as e:
                    self.netem_error = e.to_json()
                    self.notes.append(f"netem delay refused, links are shaped by tbf only: {e}")
            if self.netem_active:
                self.run(*prefix, "tc", "qdisc", "replace", "dev", dev, "parent", "1:1", "handle", "10:", *tbf)
            else:
                self.run(*prefix, "tc", "qdisc", "replace", "dev", dev, "root", *tbf)
        self.shaped = True

    def unshape(self) -> None:
        """Remove every qdisc this module added: the links fall back to the kernel's default (unlimited)."""
        for prefix, dev in self._ends():
            self.run(*prefix, "tc", "qdisc", "del", "dev", dev, "root")
        self.shaped = self.netem_active = False

    def cut(self, name: str) -> None:
        """Take ``name``'s link down: nothing passes either way until ``restore``."""
        self.run("ip", "link", "set", self.veth[name][0], "down")

    def restore(self, name: str) -> None:
        self.run("ip", "link", "set", self.veth[name][0], "up")

    def wrap(self, name: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[name]]

    def host(self, name: str) -> str:
        return self.ip[name]


PROBE_SERVER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(30)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(30); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    n += len(b)
c.sendall(str(n).encode()); c.close()
"""

PROBE_CLIENT = r"""
import socket, sys, time
n = int(sys.argv[3]); chunk = b"\0" * (1 << 16)
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
t0 = time.perf_counter(); sent = 0
while sent < n:
    c.sendall(chunk); sent += len(chunk)
c.shutdown(socket.SHUT_WR); got = int(c.recv(64)); dt = time.perf_counter() - t0
print(got, dt, flush=True)
"""


def probe_link(net: Netns, src: str, dst: str, megabytes: int) -> dict:
    """Push ``megabytes`` MB over TCP from ``src``'s namespace to ``dst``'s; bounded by timeouts."""
    port = "47123"
    server = subprocess.Popen(
        [*net.wrap(dst), sys.executable, "-c", PROBE_SERVER, net.ip[dst], port],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    try:
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"probe server did not start: {server.stderr.read()[:500]}")
        done = subprocess.run(
            [*net.wrap(src), sys.executable, "-c", PROBE_CLIENT, net.ip[dst], port, str(megabytes << 20)],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise RuntimeError(f"probe client failed: {done.stderr.strip()[-500:]}")
        got, seconds = done.stdout.split()
        return {
            "from": src, "to": dst, "bytes": int(got), "seconds": round(float(seconds), 3),
            "mbit_per_s": round(int(got) * 8 / float(seconds) / 1e6, 1),
        }
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(5)
