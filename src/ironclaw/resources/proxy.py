"""Per-sandbox egress proxy: the only way a sandbox reaches hosts by name.

The sandbox's firewall chain lets it reach nothing but this proxy (plus address allows),
so a name the proxy refuses cannot be reached some other way. The proxy resolves names
itself (a hosts map first, then the system resolver) so the sandbox needs no DNS, and
it checks names, not addresses:

* ``CONNECT name:443``: allowed names only, and the TLS ClientHello that follows must
  carry the same name as SNI; the upstream connection is opened only after that check.
* ``GET http://name/...`` (port 80): the URL host and the ``Host`` header must agree.

Deny patterns win over allow patterns. Resolved addresses that are loopback, link-local,
multicast, unspecified or inside a blocked range (the sandbox pool) are refused, so an
allowed name cannot be pointed back at the host or at another sandbox. Every decision
is appended to the sandbox's audit log as one JSON line. The policy file is re-read
when it changes (checked per connection), so an update is in force as soon as the
manager's atomic rename returns.

Run as ``python -m ironclaw.resources.proxy --listen ADDR:PORT --config FILE --audit FILE``;
it prints ``READY`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ironclaw.policy.domains import domain_allowed

__all__ = ["ProxyConfig", "ProxyServer", "main", "parse_sni"]

_HEAD_LIMIT = 16384
_HEAD_TIMEOUT = 15.0
_CONNECT_TIMEOUT = 10.0
_HOP_HEADERS = {"proxy-connection", "proxy-authorization", "connection", "keep-alive"}


@dataclass
class ProxyConfig:
    sandbox_id: str = ""
    allow_domains: tuple[str, ...] = ()
    deny_domains: tuple[str, ...] = ()
    hosts: dict[str, str] = field(default_factory=dict)
    block: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_file(cls, path: str) -> ProxyConfig:
        with open(path, "rb") as f:
            return cls.from_json(f.read())

    @classmethod
    def from_json(cls, data: bytes) -> ProxyConfig:
        doc: dict[str, Any] = json.loads(data)
        return cls(
            sandbox_id=str(doc.get("sandbox_id", "")),
            allow_domains=tuple(doc.get("allow_domains", ())),
            deny_domains=tuple(doc.get("deny_domains", ())),
            hosts={str(k).lower(): str(v) for k, v in doc.get("hosts", {}).items()},
            block=tuple(ipaddress.ip_network(b) for b in doc.get("block", ())),
        )


class _Denied(Exception):
    """A request refused by policy; the message goes to the audit log and the client."""


def parse_sni(hello: bytes) -> str | None:
    """The server name of a TLS ClientHello record, or None if absent or malformed."""
    try:
        if len(hello) < 5 or hello[0] != 0x16:
            return None
        body = hello[5 : 5 + int.from_bytes(hello[3:5], "big")]
        if body[0] != 0x01:  # handshake type client_hello
            return None
        pos = 4 + 2 + 32  # handshake header, legacy version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
        pos += 1 + body[pos]  # compression methods
        end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            etype = int.from_bytes(body[pos : pos + 2], "big")
            elen = int.from_bytes(body[pos + 2 : pos + 4], "big")
            ext = body[pos + 4 : pos + 4 + elen]
            pos += 4 + elen
            if etype != 0:  # server_name
                continue
            p = 2
            while p + 3 <= len(ext):
                ntype, nlen = ext[p], int.from_bytes(ext[p + 1 : p + 3], "big")
                if ntype == 0:
                    return ext[p + 3 : p + 3 + nlen].decode("ascii").lower()
                p += 3 + nlen
        return None
    except (IndexError, UnicodeDecodeError):
        return None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


class ProxyServer:
    """The proxy's state: listening socket, current policy, audit sink."""

    def __init__(self, config_path: str, audit_path: str, sandbox_id: str) -> None:
        # Both are opened now, while the proxy may still be root: after it drops to its
        # own uid it can no longer walk IronClaw's 0700 directories. The policy is then
        # re-read relative to its directory's descriptor (only that directory, owned by
        # the proxy's uid, needs to be searchable), the audit log through its descriptor.
        self.config_dir = os.open(
            os.path.dirname(config_path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        )
        self.config_name = os.path.basename(config_path)
        self.audit_fd = os.open(
            audit_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        self.sandbox_id = sandbox_id
        self._config = ProxyConfig()
        self._config_key: tuple[int, int, int] | None = None

    def config(self) -> ProxyConfig:
        """Current policy; re-read whenever the file was replaced."""
        st = os.stat(self.config_name, dir_fd=self.config_dir)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._config_key:
            fd = os.open(self.config_name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.config_dir)
            with os.fdopen(fd, "rb") as f:
                self._config = ProxyConfig.from_json(f.read())
            self._config_key = key
        return self._config

    def audit(self, decision: str, **fields: Any) -> None:
        record = {
            "ts": round(time.time(), 6),
            "event": "net.proxy",
            "sandbox_id": self.sandbox_id,
            "decision": decision,
            **fields,
        }
        # One write per line on an O_APPEND descriptor: lines never interleave.
        os.write(self.audit_fd, (json.dumps(record) + "\n").encode())

    async def resolve(self, cfg: ProxyConfig, host: str, port: int) -> str:
        if host in cfg.hosts:
            addrs = [cfg.hosts[host]]
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise _Denied(f"cannot resolve {host}: {exc}") from None
            addrs = [str(info[4][0]) for info in infos]
        for addr in addrs:
            ip = ipaddress.ip_address(addr)
            bad = (
                ip.is_loopback
                or ip.is_link_local
                or ip.is_multicast
                or ip.is_unspecified
                or any(ip in net for net in cfg.block)
            )
            if not bad:
                return addr
        raise _Denied(f"{host} resolves only to forbidden addresses {addrs}")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        info: dict[str, Any] = {"client": f"{peer[0]}:{peer[1]}" if peer else None}
        try:
            async with asyncio.timeout(_HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            writer.close()
            return
        try:
            await self._serve(head, reader, writer, info)
        except _Denied as exc:
            self.audit("deny", reason=str(exc), **info)
            with contextlib.suppress(OSError):
                if not info.get("tunnel_open"):
                    body = f"ironclaw egress proxy: {exc}\n".encode()
                    writer.write(
                        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
                        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                        + body
                    )
                    await writer.drain()
        except (ConnectionError, OSError, TimeoutError) as exc:
            self.audit("error", reason=f"{type(exc).__name__}: {exc}", **info)
        finally:
            writer.close()

    async def _serve(
        self,
        head: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        info: dict[str, Any],
    ) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            raise _Denied("malformed request line")
        method, target, version = parts
        headers = [tuple(h.split(":", 1)) for h in lines[1:] if ":" in h]
        info["method"] = method
        cfg = self.config()
        if method == "CONNECT":
            host, _, port_text = target.rpartition(":")
            host = host.strip("[]").lower().rstrip(".")
            info.update(host=host, port=port_text)
            if port_text != "443":
                raise _Denied("CONNECT is allowed to port 443 only")
            self._check_name(cfg, host)
            addr = await self.resolve(cfg, host, 443)
            info["addr"] = addr
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            info["tunnel_open"] = True
            hello = await self._read_client_hello(reader)
            sni = parse_sni(hello)
            if sni != host:
                raise _Denied(f"TLS SNI {sni!r} does not match CONNECT host {host!r}")
            up_reader, up_writer = await self._open(addr, 443)
            up_writer.write(hello)
            self.audit("allow", **{k: v for k, v in info.items() if k != "tunnel_open"})
            await self._splice(reader, writer, up_reader, up_writer)
            return
        if not target.startswith("http://"):
            raise _Denied("only CONNECT and absolute http:// requests are proxied")
        rest = target[len("http://") :]
        authority, slash, path = rest.partition("/")
        host, _, port_text = authority.rpartition(":") if ":" in authority else (authority, "", "")
        host = host.lower().rstrip(".")
        port = int(port_text) if port_text.isdigit() else (80 if not port_text else -1)
        info.update(host=host, port=str(port))
        if port != 80:
            raise _Denied("plain HTTP is allowed to port 80 only")
        host_hdr = next((v.strip() for k, v in headers if k.strip().lower() == "host"), None)
        hdr_name = (host_hdr or "").lower().rstrip(".")
        hdr_name = hdr_name[: -len(":80")] if hdr_name.endswith(":80") else hdr_name
        if hdr_name != host:
            raise _Denied(f"Host header {host_hdr!r} does not match URL host {host!r}")
        self._check_name(cfg, host)
        addr = await self.resolve(cfg, host, 80)
        info["addr"] = addr
        up_reader, up_writer = await self._open(addr, 80)
        out = [f"{method} {slash}{path} {version}"]
        out += [f"{k}:{v}" for k, v in headers if k.strip().lower() not in _HOP_HEADERS]
        out.append("Connection: close")
        up_writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
        self.audit("allow", **info)
        await self._splice(reader, writer, up_reader, up_writer)

    def _check_name(self, cfg: ProxyConfig, host: str) -> None:
        ok, reason = domain_allowed(host, cfg.allow_domains, cfg.deny_domains)
        if not ok:
            raise _Denied(f"{host}: {reason}")

    async def _read_client_hello(self, reader: asyncio.StreamReader) -> bytes:
        try:
            async with asyncio.timeout(_HEAD_TIMEOUT):
                header = await reader.readexactly(5)
                length = int.from_bytes(header[3:5], "big")
                if header[0] != 0x16 or length > _HEAD_LIMIT:
                    raise _Denied("tunnel did not start with a TLS ClientHello")
                return header + await reader.readexactly(length)
        except (TimeoutError, asyncio.IncompleteReadError):
            raise _Denied("no TLS ClientHello received") from None

    async def _open(
        self, addr: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                return await asyncio.open_connection(addr, port)
        except (OSError, TimeoutError) as exc:
            raise _Denied(f"upstream {addr}:{port} unreachable: {exc}") from None

    async def _splice(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()


def drop_privileges(uid: int) -> None:
    """Become ``uid`` (no groups, no capabilities) for good: the proxy parses untrusted
    requests and needs nothing of root once its socket and files are open."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise SystemExit("failed to drop root")


async def _serve_forever(args: argparse.Namespace) -> None:
    host, _, port = args.listen.rpartition(":")
    proxy = ProxyServer(args.config, args.audit, args.sandbox_id)
    proxy.config()  # fail early on a broken policy file
    server = await asyncio.start_server(
        proxy.handle, host.strip("[]"), int(port), limit=_HEAD_LIMIT
    )
    if args.user is not None:
        # Modules used later (name resolution runs on a thread pool) are loaded while the
        # proxy can still read wherever its interpreter lives.
        import concurrent.futures.thread  # noqa: F401
        import encodings.idna  # noqa: F401

        drop_privileges(args.user)
        proxy.config()  # still readable through the directory descriptor
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    # Detach from the creator's pipe: it may exit long before we do.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ironclaw.resources.proxy", description=__doc__)
    parser.add_argument("--listen", required=True, help="ADDR:PORT to listen on")
    parser.add_argument("--config", required=True, help="policy file (JSON), re-read on change")
    parser.add_argument("--audit", required=True, help="audit log to append JSON lines to")
    parser.add_argument("--sandbox-id", default="", help="recorded in every audit line")
    parser.add_argument("--user", type=int, help="uid to drop to once listening (as root)")
    args = parser.parse_args(argv)
    asyncio.run(_serve_forever(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
