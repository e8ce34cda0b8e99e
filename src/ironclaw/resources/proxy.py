"""Per-sandbox egress proxy: the only way a sandbox reaches hosts by name.

The sandbox's firewall chain lets it reach nothing but this proxy (plus address allows),
so a name the proxy refuses cannot be reached some other way. Everything the sandbox
sends is hostile, so the proxy:

* accepts names only, never address literals (``CONNECT 10.0.0.1:443``,
  ``http://[::1]/``, ``http://2130706433/`` are refused): the policy is names;
* ``CONNECT name:443``: allowed names only, and the TLS ClientHello that follows must
  carry the same name as SNI; the upstream connection is opened only after that check;
* ``GET http://name/...`` (port 80): every request of a keep-alive connection is parsed
  and checked, and the ``Host`` header must agree with the URL; anything two parsers
  could read differently gets 400 (:mod:`ironclaw.resources.proxy_http`);
* resolves each name once (a hosts map first, then the system resolver), refuses the
  name if any address is not global unicast (:mod:`ironclaw.policy.addresses`: the IPv4
  inside mapped, compatible, 6to4, NAT64 and Teredo forms included), inside the sandbox
  pool or one of the host's own addresses (:mod:`ironclaw.resources.host_addresses`),
  unless an explicit address rule allows it, and connects to the checked address,
  never by name again.

Deny patterns win over allow patterns. Every decision is appended to the sandbox's audit
log as one JSON line. The policy file is re-read when it changes (checked per request),
so an update is in force as soon as the manager's atomic rename returns.

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
from typing import Any, TypedDict

from ironclaw.policy.addresses import (
    AddressRule,
    IPAddress,
    IPNetwork,
    NetworkSet,
    egress_refusal,
    forms,
    is_ip_literal,
)
from ironclaw.policy.domains import domain_allowed
from ironclaw.resources.host_addresses import is_local_address, local_networks, nonlocal_bind
from ironclaw.resources.proxy_http import (
    EOF,
    BadMessage,
    Message,
    parse_sni,
    read_message,
    relay_body,
    request_framing,
    response_framing,
    split_absolute,
)

__all__ = ["ProxyConfig", "ProxyServer", "main", "parse_sni"]

_HEAD_LIMIT = 16384
_HEAD_TIMEOUT = 15.0
_CONNECT_TIMEOUT = 10.0
_HOP_HEADERS = {
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
}


@dataclass
class ProxyConfig:
    sandbox_id: str = ""
    allow_domains: tuple[str, ...] = ()
    deny_domains: tuple[str, ...] = ()
    #: name -> address or addresses, consulted before DNS (tests, air-gapped hosts)
    hosts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: never connected to: the sandbox pool
    block: tuple[IPNetwork, ...] = ()
    #: explicit address rules: the only way to reach a non-global or host address
    allow_addresses: tuple[AddressRule, ...] = ()

    @classmethod
    def from_file(cls, path: str) -> ProxyConfig:
        with open(path, "rb") as f:
            return cls.from_json(f.read())

    @classmethod
    def from_json(cls, data: bytes) -> ProxyConfig:
        doc: dict[str, Any] = json.loads(data)
        hosts = {
            str(k).lower().rstrip("."): (v,) if isinstance(v, str) else tuple(map(str, v))
            for k, v in doc.get("hosts", {}).items()
        }
        return cls(
            sandbox_id=str(doc.get("sandbox_id", "")),
            allow_domains=tuple(doc.get("allow_domains", ())),
            deny_domains=tuple(doc.get("deny_domains", ())),
            hosts=hosts,
            block=tuple(ipaddress.ip_network(b) for b in doc.get("block", ())),
            allow_addresses=tuple(AddressRule.from_json(r) for r in doc.get("allow_addresses", ())),
        )


class _Request(TypedDict, total=False):
    """What the audit line says of one request, filled in as the request is read."""

    client: str | None
    method: str
    host: str
    port: str
    addr: str
    tunnel_open: bool


class _Denied(Exception):
    """A request refused by policy; the message goes to the audit log and the client."""


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


def _reply(writer: asyncio.StreamWriter, status: str, text: str) -> None:
    body = f"ironclaw egress proxy: {text}\n".encode()
    writer.write(
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body
    )


def _authority_host(authority: str) -> tuple[str, int]:
    """Host and port of a Host header or CONNECT target, lower-cased, no trailing dot."""
    host, port, path = split_absolute("http://" + authority)
    if path != "/" or authority.endswith("/"):
        raise BadMessage(f"bad authority {authority!r}")
    return host.rstrip("."), port


@dataclass(frozen=True)
class _Client:
    """One client connection and the audit fields of the request it is making."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    info: _Request


class ProxyServer:
    """The proxy's state: listening socket, current policy, audit sink, own addresses."""

    def __init__(
        self,
        config_path: str,
        audit_path: str,
        sandbox_id: str,
        own: Sequence[IPNetwork] | None = None,
    ) -> None:
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
        #: The host's addresses, read once: what an allowed name must never point at.
        self.own = NetworkSet(own if own is not None else local_networks())
        #: And asked of the kernel per address, unless any address may be bound here.
        self.probe_local = not nonlocal_bind()
        self._config = ProxyConfig()
        self._config_key: tuple[int, int, int] | None = None

    def config(self) -> ProxyConfig:
        """Current policy; re-read whenever the file was replaced."""
        st = os.stat(self.config_name, dir_fd=self.config_dir, follow_symlinks=False)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._config_key:
            fd = os.open(
                self.config_name,
                os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                dir_fd=self.config_dir,
            )
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

    async def resolve(self, cfg: ProxyConfig, host: str, port: int) -> list[IPAddress]:
        """Every address of ``host``, each checked; refused if any one is forbidden."""
        if host in cfg.hosts:
            texts = list(cfg.hosts[host])
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
                )
            except OSError as exc:
                raise _Denied(f"cannot resolve {host}: {exc}") from None
            texts = [str(info[4][0]) for info in infos]
        addrs: list[IPAddress] = []
        for text in dict.fromkeys(texts):
            try:
                ip = ipaddress.ip_address(text.split("%", 1)[0])
            except ValueError:
                raise _Denied(f"{host} resolves to {text!r}, not an address") from None
            why = egress_refusal(ip, port, allow=cfg.allow_addresses, block=cfg.block, own=self.own)
            explicit = any(rule.covers(ip, port) for rule in cfg.allow_addresses)
            if why is None and self.probe_local and not explicit:
                local = [str(f) for f in forms(ip) if is_local_address(f)]
                if local:
                    why = f"{local[-1]} is an address of this host"
            if why is not None:
                raise _Denied(f"{host} resolves to forbidden address {ip}: {why}")
            addrs.append(ip)
        if not addrs:
            raise _Denied(f"{host} has no address")
        return addrs

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if peer else None
        try:
            while True:
                if not await self._one(_Client(reader, writer, {"client": client})):
                    break
        except (ConnectionError, OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            self.audit("error", reason=f"{type(exc).__name__}: {exc}", client=client)
        finally:
            writer.close()

    async def _one(self, client: _Client) -> bool:
        """Serve one request; True if the connection may carry another."""
        try:
            try:
                async with asyncio.timeout(_HEAD_TIMEOUT):
                    req = await read_message(client.reader, request=True, limit=_HEAD_LIMIT)
            except TimeoutError:
                return False
            if req is None:
                return False
            client.info["method"] = req.start[0]
            cfg = self.config()
            if req.start[0] == "CONNECT":
                await self._connect(cfg, req, client)
                return False
            return await self._forward(cfg, req, client)
        except (BadMessage, _Denied) as exc:
            bad = isinstance(exc, BadMessage)
            self.audit("deny", reason=f"bad request: {exc}" if bad else str(exc), **client.info)
            if not client.info.get("tunnel_open"):
                with contextlib.suppress(OSError):
                    _reply(client.writer, "400 Bad Request" if bad else "403 Forbidden", str(exc))
                    await client.writer.drain()
            return False

    def _check_name(self, cfg: ProxyConfig, host: str) -> None:
        if is_ip_literal(host):
            raise _Denied(f"{host}: address literals are refused; the policy allows names")
        ok, reason = domain_allowed(host, cfg.allow_domains, cfg.deny_domains)
        if not ok:
            raise _Denied(f"{host}: {reason}")

    async def _connect(self, cfg: ProxyConfig, req: Message, client: _Client) -> None:
        reader, writer, info = client.reader, client.writer, client.info
        target = req.start[1]
        host, port = _authority_host(target)
        if target.rpartition(":")[2] != "443" or port != 443:
            info["host"], info["port"] = host, str(port)
            raise _Denied("CONNECT is allowed to port 443 only")
        info["host"], info["port"] = host, "443"
        hosts = req.get_all("host")
        if len(hosts) > 1:
            raise BadMessage("more than one Host header")
        if hosts and _authority_host(hosts[0])[0] != host:
            raise BadMessage(f"Host header {hosts[0]!r} does not match CONNECT {target!r}")
        if req.get_all("content-length") or req.get_all("transfer-encoding"):
            raise BadMessage("CONNECT with a body")
        self._check_name(cfg, host)
        addrs = await self.resolve(cfg, host, 443)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        info["tunnel_open"] = True
        hello = await self._read_client_hello(reader)
        sni = parse_sni(hello)
        if sni is None or sni.rstrip(".") != host:
            raise _Denied(f"TLS SNI {sni!r} does not match CONNECT host {host!r}")
        up_reader, up_writer = await self._open(addrs, 443, info)
        up_writer.write(hello)
        self.audit("allow", **{k: v for k, v in info.items() if k != "tunnel_open"})
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()

    async def _forward(self, cfg: ProxyConfig, req: Message, client: _Client) -> bool:
        reader, writer, info = client.reader, client.writer, client.info
        method, target, version = req.start
        if not target[:7].lower() == "http://":
            raise _Denied("only CONNECT and absolute http:// requests are proxied")
        host, port, path = split_absolute(target)
        host = host.rstrip(".")
        info["host"], info["port"] = host, str(port)
        hosts = req.get_all("host")
        if len(hosts) != 1:
            raise BadMessage("more than one Host header" if hosts else "no Host header")
        if _authority_host(hosts[0]) != (host, port):
            raise BadMessage(f"Host header {hosts[0]!r} does not match URL host {host!r}")
        framing = request_framing(req)
        if port != 80:
            raise _Denied("plain HTTP is allowed to port 80 only")
        self._check_name(cfg, host)
        addrs = await self.resolve(cfg, host, 80)
        up_reader, up_writer = await self._open(addrs, 80, info)
        try:
            drop = _HOP_HEADERS | set(req.tokens("connection"))
            out = [f"{method} {path} {version}"]
            out += [f"{k}: {v}" for k, v in req.headers if k.lower() not in drop]
            out.append("Connection: close")
            up_writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1"))
            self.audit("allow", **info)
            await relay_body(reader, up_writer, framing)
            return await self._response(method, version, req, up_reader, writer)
        finally:
            up_writer.close()

    async def _response(
        self,
        method: str,
        version: str,
        req: Message,
        up_reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Relay the upstream response; True if the client connection stays usable."""
        try:
            while True:
                resp = await read_message(up_reader, request=False, limit=_HEAD_LIMIT)
                if resp is None:
                    raise BadMessage("upstream closed without a response")
                status = int(resp.start[1])
                if status == 101:
                    raise BadMessage("upstream switched protocols")
                framing = response_framing(resp, method)
                head = [" ".join(resp.start).rstrip()]
                head += [f"{k}: {v}" for k, v in resp.headers]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
                if status >= 200:
                    break
        except BadMessage as exc:
            _reply(writer, "502 Bad Gateway", f"upstream: {exc}")
            await writer.drain()
            return False
        try:
            await relay_body(up_reader, writer, framing)
        except BadMessage:
            return False  # the upstream's framing broke mid-body: end the connection
        await writer.drain()
        closing = "close" in req.tokens("connection") or "close" in resp.tokens("connection")
        return framing != EOF and version == "HTTP/1.1" and not closing

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
        self, addrs: Sequence[IPAddress], port: int, info: _Request
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the first reachable checked address: by address, no second lookup."""
        loop = asyncio.get_running_loop()
        errors: list[str] = []
        for ip in addrs:
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(_CONNECT_TIMEOUT):
                    await loop.sock_connect(sock, (str(ip), port))
                reader, writer = await asyncio.open_connection(sock=sock, limit=_HEAD_LIMIT)
            except (OSError, TimeoutError) as exc:
                sock.close()
                errors.append(f"{ip}: {exc or type(exc).__name__}")
                continue
            info["addr"] = str(ip)
            return reader, writer
        raise _Denied(f"upstream port {port} unreachable: {'; '.join(errors)}")


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
