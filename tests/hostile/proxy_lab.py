"""A lab for attacking the real egress proxy process, built with the ``ip`` tool.

Two network namespaces made here, nothing else touched:

* ``P`` runs the proxy exactly as production does (the distribution's interpreter, the
  stdlib-only bundle, dropped to the proxies' uid), listening on 127.0.0.1:3128. Its
  "host" addresses are loopback, 169.254.169.254, 10.20.30.40, 100.64.1.1 and the
  global-looking 11.0.0.1 and 2600:ffff::1. A trap server listens on every one of them
  (ports 80 and 443, dual-stack) and logs each connection: only 127.0.0.2, which the
  policy allows by address rule, may ever appear there.
* ``G`` is the outside world: 11.0.1.2 (the allowed destination, reached over a veth)
  and 11.0.3.2, inside the range configured as the sandbox pool, which must never be
  reached.

The proxy's hosts map is the attacker's DNS: it points allowed names at all of those.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ironclaw.resources.guest_bundle import GUEST_PYTHON, bundle_path

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

SERVER = r"""
import socket, sys, threading
tag, log = sys.argv[1], open(sys.argv[2], "a", buffering=1)
lock = threading.Lock()
def serve(conn, port):
    conn.settimeout(5)
    try:
        local = conn.getsockname()[0].removeprefix("::ffff:")
        with lock:
            log.write(f"{local}\n")
        if port == 443:
            data = conn.recv(65536)
            conn.sendall(f"{tag}-tls:{local}:{len(data)}\n".encode())
            return
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        hdrs = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs.setdefault(k.strip().lower(), v.strip())
        n = int(hdrs.get("content-length", "0"))
        while len(body) < n or (hdrs.get("transfer-encoding") == "chunked"
                                and not body.endswith(b"0\r\n\r\n")):
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        reply = f"{tag}:{local}:{lines[0]}:{hdrs.get('host', '')}:{len(body)}".encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))
    except OSError:
        pass
    finally:
        conn.close()
def accept(sock, port):
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve, args=(conn, port), daemon=True).start()
for port in (80, 443):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(64)
    threading.Thread(target=accept, args=(s, port), daemon=True).start()
print("READY", flush=True)
sys.stdin.read()
"""

PROXY_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from ironclaw.resources.proxy import main; sys.exit(main(sys.argv[1:]))"
)

PEER = "11.0.1.2"
POOL_PEER = "11.0.3.2"
TRAP_ADDRS_V4 = ("169.254.169.254", "10.20.30.40", "100.64.1.1", "11.0.0.1")
OWN_V6 = "2600:ffff::1"
EXPLICIT = "127.0.0.2"
LATE = "11.0.0.9"  # becomes an address of the proxy's host after the proxy started

HOSTS: dict[str, str | list[str]] = {
    "ok.allowed.test": PEER,
    "denied.allowed.test": PEER,
    "explicit.allowed.test": EXPLICIT,
    "tlsonly.allowed.test": "127.0.0.3",
    "loop.allowed.test": "127.0.0.1",
    "mapped.allowed.test": "::ffff:127.0.0.1",
    "meta.allowed.test": "169.254.169.254",
    "mapmeta.allowed.test": "::ffff:169.254.169.254",
    "private.allowed.test": "10.20.30.40",
    "mapprivate.allowed.test": "::ffff:10.20.30.40",
    "cgnat.allowed.test": "100.64.1.1",
    "own.allowed.test": "11.0.0.1",
    "mapown.allowed.test": "::ffff:11.0.0.1",
    "own6.allowed.test": OWN_V6,
    "v6loop.allowed.test": "::1",
    "compat.allowed.test": "::127.0.0.1",
    "nat64.allowed.test": "64:ff9b::127.0.0.1",
    "sixtofour.allowed.test": "2002:7f00:1::1",
    "unspec.allowed.test": "0.0.0.0",
    "unspec6.allowed.test": "::",
    "pool.allowed.test": POOL_PEER,
    "mixed.allowed.test": [PEER, "127.0.0.1"],
    "mappedok.allowed.test": f"::ffff:{PEER}",
    "late.allowed.test": LATE,
}

POLICY = {
    "sandbox_id": "hostile",
    "allow_domains": ["allowed.test", "*.allowed.test"],
    "deny_domains": ["denied.allowed.test"],
    "hosts": HOSTS,
    "block": ["11.0.3.0/24"],
    "allow_addresses": [
        {"network": f"{EXPLICIT}/32", "port": None},
        {"network": "127.0.0.3/32", "port": 443},
    ],
}


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


def _in_netns(path: str, fn: object) -> None:
    """Run ``fn`` on a throw-away thread that first joins the namespace at ``path``."""
    errors: list[BaseException] = []

    def body() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            fn()  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@dataclass
class Lab:
    root: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def p(self) -> str:
        return f"ictx-{self.tag}-p"

    @property
    def g(self) -> str:
        return f"ictx-{self.tag}-g"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    def start(self, proxy_uid: int) -> None:
        p, g = ("ip", "netns", "exec", self.p, "ip"), ("ip", "netns", "exec", self.g, "ip")
        run("ip", "netns", "add", self.p)
        run("ip", "netns", "add", self.g)
        run(*p, "link", "set", "lo", "up")
        for addr in TRAP_ADDRS_V4:
            run(*p, "addr", "add", f"{addr}/32", "dev", "lo")
        run(*p, "-6", "addr", "add", f"{OWN_V6}/128", "dev", "lo")
        run(*p, "link", "add", "v0", "type", "veth", "peer", "name", "eth0", "netns", self.g)
        run(*p, "addr", "add", "11.0.1.1/30", "dev", "v0")
        run(*p, "link", "set", "v0", "up")
        run(*g, "link", "set", "lo", "up")
        run(*g, "addr", "add", f"{PEER}/30", "dev", "eth0")
        run(*g, "addr", "add", f"{POOL_PEER}/32", "dev", "eth0")
        run(*g, "link", "set", "eth0", "up")
        run(*p, "route", "add", "11.0.3.0/24", "via", PEER)
        run(*g, "route", "add", "default", "via", "11.0.1.1")
        self._serve(self.p, "trap")
        self._serve(self.g, "peer")
        conf = self.root / "proxy"
        conf.mkdir(mode=0o700)
        (conf / "proxy.json").write_text(json.dumps(POLICY))
        os.chmod(conf / "proxy.json", 0o644)
        os.chown(conf, proxy_uid, proxy_uid)
        bundle = bundle_path(self.root / "state")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.p, GUEST_PYTHON, "-I", "-S", "-B", "-c", PROXY_BOOT,
             str(bundle), "--user", str(proxy_uid), "--listen", "127.0.0.1:3128",
             "--config", str(conf / "proxy.json"), "--audit", str(self.audit),
             "--sandbox-id", "hostile"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"READY", proc.stderr.read() if proc.stderr else line

    def _serve(self, netns: str, tag: str) -> None:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, GUEST_PYTHON, "-c", SERVER, tag,
             str(self.root / f"{tag}.log")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        self.procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"READY"

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=10)
        for ns in (self.p, self.g):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

    def add_address_later(self) -> None:
        run("ip", "netns", "exec", self.p, "ip", "addr", "add", f"{LATE}/32", "dev", "lo")

    # --- observations ------------------------------------------------------------------

    def hits(self, tag: str) -> list[str]:
        """Local addresses of every connection the trap (or the peer) accepted so far."""
        path = self.root / f"{tag}.log"
        return path.read_text().split() if path.exists() else []

    def forbidden_hits(self) -> list[str]:
        """Connections that reached anything but the allowed destinations: must stay []."""
        allowed = (EXPLICIT, "127.0.0.3", PEER)
        return [a for a in self.hits("trap") + self.hits("peer") if a not in allowed]

    def audit_lines(self) -> list[dict[str, object]]:
        return [json.loads(x) for x in self.audit.read_text().splitlines()]

    # --- the hostile client --------------------------------------------------------------

    def connect(self) -> socket.socket:
        """A TCP connection to the proxy from inside its namespace."""
        out: list[socket.socket] = []

        def body() -> None:
            out.append(socket.create_connection(("127.0.0.1", 3128), timeout=10))

        _in_netns(f"/run/netns/{self.p}", body)
        return out[0]

    def exchange(self, raw: bytes) -> bytes:
        """Send ``raw`` on one connection, half-close it, read until the proxy closes it."""
        with contextlib.closing(self.connect()) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            return _read_all(s)

    def tunnel(self, host: str, sni: str, *, extra: str = "") -> tuple[bytes, bytes]:
        """CONNECT then a real TLS ClientHello: (the proxy's answer, what came back)."""
        ctx = ssl.create_default_context()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.do_handshake()
        with contextlib.closing(self.connect()) as s:
            s.sendall(f"CONNECT {host} HTTP/1.1\r\n{extra}\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                if not chunk:
                    return head, b""
                head += chunk
            if not head.startswith(b"HTTP/1.1 200"):
                return head + _read_all(s), b""
            s.sendall(outgoing.read())
            return head, _read_all(s)


def _read_all(s: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            data += chunk
    return data


def statuses(data: bytes) -> list[int]:
    """Status codes of every response in ``data``, in order (bodies skipped by length)."""
    out: list[int] = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
        assert sep and match, head
        out.append(int(match[1]))
        length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
        data = data[int(length[1]) :] if length else b""
    return out


def get(host: str, *, path: str = "/", extra: str = "") -> bytes:
    return f"GET http://{host}{path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
