"""Firewall scaling: set-keyed dispatch against the old one-jump-rule-per-sandbox design.

Measures the TCP round-trip p50 (an established flow) and the TCP connect p50 (a new flow,
which goes through the allow-set lookups) from a real sandbox namespace to a peer
namespace with 1 and with 10,000 sandboxes installed (the others' elements use interface
names with no device behind them), then the round trip with 10,000 linear jump rules (the
measured sandbox's rule last, as the newest sandbox's would be), and the firewall's
set-up plus tear-down time per sandbox with few and with 10,000 installed. Uses private
tables, never the real ``ironclaw`` table. ``--json`` prints one JSON line. ``--no-destroy``
uses the DEL fallback of kernels before 6.3 for every deletion, whatever this kernel has.

Run as root: ``.venv/bin/python benchmarks/firewall.py --json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from ironclaw.config import Settings
from ironclaw.policy import netlink as nl
from ironclaw.policy.network import FAMILY, NetworkPolicy, sandbox_names
from ironclaw.policy.nftables import sandbox_elements
from ironclaw.resources import firewall as fwmod
from ironclaw.resources.firewall import Firewall
from ironclaw.resources.net import NetworkManager

TABLE = "icbench"
LINEAR = "icbench_linear"
PEER_NS, PEER_IF, PEER_HOST_IP, PEER_IP = "icbp-peer", "icbppeer", "10.247.0.1", "10.247.0.2"
PORT = 7000
# Client and echo server share one CPU: a cross-CPU wake-up alone costs ~80 us on a small
# VM and made round trips bimodal (~11 or ~90 us) from run to run, drowning the firewall.
PIN = ("taskset", "-c", "0")

ECHO = r"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7000)); s.listen(8); print("READY", flush=True)
while True:
    c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while d := c.recv(64):
        c.sendall(d)
    c.close()
"""

PING = r"""
import socket, sys, time, statistics
n = int(sys.argv[2])
s = socket.create_connection((sys.argv[1], 7000), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(200):
    s.sendall(b"x"); s.recv(1)
samples = []
for _ in range(n):
    t = time.perf_counter_ns(); s.sendall(b"x"); s.recv(1)
    samples.append(time.perf_counter_ns() - t)
print(statistics.median(samples) / 1000)
"""

CONNECT = r"""
import socket, sys, time, statistics
samples = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter_ns()
    s = socket.create_connection((sys.argv[1], 7000), timeout=5)
    samples.append(time.perf_counter_ns() - t)
    s.close()
print(statistics.median(samples) / 1000)
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def setup_peer() -> subprocess.Popen[bytes]:
    teardown_peer()
    sh("ip", "netns", "add", PEER_NS)
    sh("ip", "link", "add", PEER_IF, "type", "veth", "peer", "name", "eth0", "netns", PEER_NS)
    sh("ip", "addr", "add", f"{PEER_HOST_IP}/30", "dev", PEER_IF)
    sh("ip", "link", "set", PEER_IF, "up")
    for cmd in (
        ["link", "set", "lo", "up"],
        ["addr", "add", f"{PEER_IP}/30", "dev", "eth0"],
        ["link", "set", "eth0", "up"],
        ["route", "add", "default", "via", PEER_HOST_IP],
    ):
        sh("ip", "netns", "exec", PEER_NS, "ip", *cmd)
    proc = subprocess.Popen(
        [*PIN, "ip", "netns", "exec", PEER_NS, sys.executable, "-c", ECHO],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"READY"
    return proc


def teardown_peer() -> None:
    subprocess.run(["ip", "link", "del", PEER_IF], capture_output=True)
    subprocess.run(["ip", "netns", "del", PEER_NS], capture_output=True)


def rtt_p50(netns: str, n: int, script: str = PING) -> float:
    out = subprocess.run(
        [*PIN, "ip", "netns", "exec", netns, sys.executable, "-c", script, PEER_IP, str(n)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return float(out.stdout)


def filler_ids(count: int) -> list[str]:
    return [f"filler-{i}" for i in range(count)]


async def add_fillers(fw: Firewall, ids: list[str], policy: NetworkPolicy) -> None:
    """Install many sandboxes fast: 250 per batch, the same elements add_sandbox writes."""
    sock = fwmod.NfTablesSocket()
    try:
        for start in range(0, len(ids), 250):
            msgs: list[tuple[int, int, bytes]] = []
            elems = []
            for sid in ids[start : start + 250]:
                msgs.append(nl.counter_msg(fw.table, sandbox_names(sid).chain, nl.MSG_NEWOBJ))
                elems += sandbox_elements(sid, policy, proxy_addr=None)
            msgs += nl.elements_msgs(fw.table, nl.MSG_NEWSETELEM, elems)
            await asyncio.to_thread(sock.transact, msgs, what="fillers")
    finally:
        sock.close()


def build_linear(ids: list[str], last: str) -> None:
    """The old design: a base chain with one ``iifname X jump chain_X`` rule per sandbox."""
    base = "chain forward { type filter hook forward priority 0; policy accept; }"
    lines = [f"table inet {LINEAR} {{", base, "}"]
    for sid in [*ids, last]:
        n = sandbox_names(sid)
        lines += [
            f"add chain inet {LINEAR} {n.chain}",
            f"add rule inet {LINEAR} {n.chain} ct state established,related accept",
            f"add rule inet {LINEAR} {n.chain} ip daddr {PEER_IP} tcp dport {PORT} counter accept",
            f"add rule inet {LINEAR} {n.chain} counter drop",
            f'add rule inet {LINEAR} forward iifname "{n.host_ifname}" jump {n.chain}',
        ]
    subprocess.run(["nft", "-f", "-"], input="\n".join(lines).encode(), check=True)


async def timed(fn: Any, n: int) -> float:
    samples = []
    for i in range(n):
        t = time.perf_counter()
        await fn(i)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


async def main(args: argparse.Namespace) -> dict[str, Any]:
    home = tempfile.mkdtemp(prefix="icbench-")
    settings = Settings.from_env({"IRONCLAW_HOME": home})
    firewall = Firewall(table=TABLE, destroy=False if args.no_destroy else None)
    mgr = NetworkManager(settings, pool="10.246.0.0/16", firewall=firewall)
    fw = mgr.firewall
    policy = NetworkPolicy(allow=(f"{PEER_IP}:{PORT}/tcp",))
    result: dict[str, Any] = {"backend": fw.backend_name, "sandboxes": args.count}
    result["deletions"] = await fw.deletion_mode()
    peer = setup_peer()
    try:
        subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True)
        net = await mgr.create("bench-sb", policy, slot=1)

        async def fw_cycle(i: int) -> None:
            await fw.add_sandbox(f"cycle-{i}", policy)
            await fw.remove_sandbox(f"cycle-{i}")

        async def net_cycle(i: int) -> None:
            await mgr.create(f"netcycle-{i}", policy, slot=100 + i)
            await mgr.destroy(f"netcycle-{i}")

        result["fw_setup_teardown_p50_ms"] = round(await timed(fw_cycle, args.cycles), 3)
        result["net_create_destroy_p50_ms"] = round(await timed(net_cycle, 20), 2)
        result["rtt_p50_us_1"] = round(rtt_p50(net.netns_name, args.pings), 2)
        result["connect_p50_us_1"] = round(rtt_p50(net.netns_name, args.connects, CONNECT), 2)

        ids = filler_ids(args.count)
        t = time.perf_counter()
        await add_fillers(fw, ids, policy)
        result["install_fillers_s"] = round(time.perf_counter() - t, 2)
        result[f"rtt_p50_us_{args.count}"] = round(rtt_p50(net.netns_name, args.pings), 2)
        connect = rtt_p50(net.netns_name, args.connects, CONNECT)
        result[f"connect_p50_us_{args.count}"] = round(connect, 2)
        result["fw_setup_teardown_p50_ms_at_scale"] = round(await timed(fw_cycle, 20), 3)
        result["ratio_scale"] = round(
            result[f"rtt_p50_us_{args.count}"] / result["rtt_p50_us_1"], 3
        )
        result["ratio_connect_scale"] = round(connect / result["connect_p50_us_1"], 3)

        # The old design, alone on the forward hook (our table removed meanwhile).
        await mgr.destroy("bench-sb")
        net = await mgr.create("bench-sb", NetworkPolicy(allow=(f"{PEER_IP}:{PORT}/tcp",)), slot=1)
        sh("nft", "delete", "table", FAMILY, TABLE)
        await asyncio.to_thread(build_linear, ids, "bench-sb")
        linear = rtt_p50(net.netns_name, max(args.pings // 4, 200))
        result[f"rtt_p50_us_linear_{args.count}"] = round(linear, 2)
        result["ratio_vs_linear"] = round(linear / result[f"rtt_p50_us_{args.count}"], 3)
    finally:
        await mgr.destroy("bench-sb")
        for table in (TABLE, LINEAR):
            subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True)
        peer.kill()
        peer.wait()
        teardown_peer()
        mgr.close()
        subprocess.run(["rm", "-rf", home], check=False)
    result["targets"] = {"ratio_scale": "<= 1.2", "ratio_vs_linear": ">= 5",
                         "fw_setup_teardown_p50_ms": "<= 10",
                         "fw_setup_teardown_p50_ms_at_scale": "<= 10"}  # fmt: skip
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--count", type=int, default=10_000, help="sandboxes' rules installed")
    parser.add_argument("--pings", type=int, default=4000, help="round trips per measurement")
    parser.add_argument("--cycles", type=int, default=100, help="set-up/tear-down cycles")
    parser.add_argument("--connects", type=int, default=500, help="connects per measurement")
    parser.add_argument(
        "--no-destroy", action="store_true", help="delete with DEL messages (pre-6.3 fallback)"
    )
    ns = parser.parse_args()
    res = asyncio.run(main(ns))
    if ns.json:
        print(json.dumps(res))
    else:
        for key, value in res.items():
            print(f"{key:40} {value}")
