"""A hostile client against the real egress proxy process, each attack beside its control.

The client speaks raw bytes over real sockets to the proxy running as in production
(see :mod:`proxy_lab`); the attacker also controls DNS (the proxy's hosts map). After
every test nothing but the allowed destinations may have seen a connection.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ironclaw.config import Settings
from ironclaw.errors import NetworkError
from ironclaw.policy.network import NetworkPolicy
from ironclaw.resources.guest_bundle import GUEST_PYTHON
from ironclaw.resources.net import NetworkManager

from .proxy_lab import EXPLICIT, PEER, Lab, get, statuses

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

PROXY_UID = int(os.environ.get("IRONCLAW_UID_BASE", "2000000000")) - 1


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("proxylab"))
    try:
        lab.start(PROXY_UID)
        yield lab
    finally:
        lab.stop()


@pytest.fixture(autouse=True)
def nothing_forbidden_reached(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: no connection reached a forbidden address during it."""
    lab = request.getfixturevalue("lab") if "lab" in request.fixturenames else None
    before = len(lab.forbidden_hits()) if lab else 0
    yield
    if lab is not None:
        after = lab.forbidden_hits()
        assert len(after) == before, after


def test_allowed_name_reaches_the_outside(lab: Lab) -> None:
    """The control for everything below: a global address by an allowed name."""
    got = lab.exchange(get("ok.allowed.test"))
    assert statuses(got) == [200]
    assert f"peer:{PEER}:GET / HTTP/1.1:ok.allowed.test:0".encode() in got
    head, data = lab.tunnel("ok.allowed.test:443", "ok.allowed.test")
    assert head.startswith(b"HTTP/1.1 200")
    assert data.startswith(f"peer-tls:{PEER}:".encode())
    # The IPv4-mapped form of a global address is that global address: allowed.
    got = lab.exchange(get("mappedok.allowed.test"))
    assert statuses(got) == [200]
    assert f"peer:{PEER}:GET / HTTP/1.1:mappedok.allowed.test:0".encode() in got


def test_address_the_host_gains_after_start_is_refused(lab: Lab) -> None:
    before = lab.exchange(get("late.allowed.test"))
    # Global and not the host's yet: allowed, tried, and nothing is there.
    assert statuses(before) == [403]
    assert b"unreachable" in before
    lab.add_address_later()
    got = lab.exchange(get("late.allowed.test"))
    assert statuses(got) == [403]
    assert b"11.0.0.9 is an address of this host" in got
    assert statuses(lab.exchange(get("ok.allowed.test"))) == [200]  # control


FORBIDDEN = [
    ("loop", "loopback"),
    ("mapped", "IPv4-mapped form of 127.0.0.1"),
    ("meta", "link-local"),
    ("mapmeta", "IPv4-mapped form of 169.254.169.254"),
    ("private", "private"),
    ("mapprivate", "IPv4-mapped form of 10.20.30.40"),
    ("cgnat", "carrier-grade NAT"),
    ("own", "11.0.0.1 is an address of this host"),
    ("mapown", "11.0.0.1 is an address of this host"),
    ("own6", "2600:ffff::1 is an address of this host"),
    ("v6loop", "loopback"),
    ("compat", "IPv4-compatible form of 127.0.0.1"),
    ("nat64", "NAT64 form of 127.0.0.1"),
    ("sixtofour", "6to4 form of 127.0.0.1"),
    ("unspec", "'this network'"),
    ("unspec6", "unspecified"),
    ("pool", "inside the blocked range 11.0.3.0/24"),
    ("mixed", "forbidden address 127.0.0.1"),
]


@pytest.mark.parametrize(("label", "reason"), FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_allowed_name_pointing_inside_is_refused(lab: Lab, label: str, reason: str) -> None:
    name = f"{label}.allowed.test"
    got = lab.exchange(get(name))
    assert statuses(got) == [403], got
    assert reason.encode() in got
    head, data = lab.tunnel(f"{name}:443", name)
    assert head.startswith(b"HTTP/1.1 403"), head
    assert data == b""
    assert statuses(lab.exchange(get("ok.allowed.test"))) == [200]  # control
    denied = [r for r in lab.audit_lines() if r.get("host") == name]
    assert [r["decision"] for r in denied][-2:] == ["deny", "deny"]


def test_explicit_address_rule_opens_exactly_its_address_and_port(lab: Lab) -> None:
    got = lab.exchange(get("explicit.allowed.test"))
    assert statuses(got) == [200]
    assert f"trap:{EXPLICIT}:GET / HTTP/1.1".encode() in got
    assert statuses(lab.exchange(get("loop.allowed.test"))) == [403]
    # 127.0.0.3 is allowed on 443 only: the tunnel passes, plain HTTP to port 80 does not.
    head, data = lab.tunnel("tlsonly.allowed.test:443", "tlsonly.allowed.test")
    assert head.startswith(b"HTTP/1.1 200")
    assert data.startswith(b"trap-tls:127.0.0.3:")
    assert statuses(lab.exchange(get("tlsonly.allowed.test"))) == [403]


@pytest.mark.parametrize(
    "target",
    ["11.0.1.2", "[::ffff:11.0.1.2]", "2130706433", "127.1", "0x7f000001", "0177.0.0.1"],
)
def test_address_literals_are_refused(lab: Lab, target: str) -> None:
    got = lab.exchange(get(target))
    assert statuses(got) == [403], got
    assert b"address literals are refused" in got
    head, _ = lab.tunnel(f"{target}:443", "ok.allowed.test")
    assert head.startswith(b"HTTP/1.1 403")
    assert b"address literals are refused" in head
    assert statuses(lab.exchange(get("ok.allowed.test"))) == [200]  # by name: fine


def test_every_request_of_a_keep_alive_connection_is_checked(lab: Lab) -> None:
    control = lab.exchange(
        get("ok.allowed.test") + get("ok.allowed.test", extra="Connection: close\r\n")
    )
    assert statuses(control) == [200, 200]
    for second in ("loop.allowed.test", "denied.allowed.test", "elsewhere.test"):
        got = lab.exchange(get("ok.allowed.test") + get(second))
        assert statuses(got) == [200, 403], (second, got)


def _post(host: str, body: bytes, framing: str) -> bytes:
    return f"POST http://{host}/ HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n".encode() + body


def test_request_smuggled_in_a_body_is_parsed_and_checked(lab: Lab) -> None:
    hidden = get("meta.allowed.test")
    # Content-Length covers 5 bytes; what follows is a second request, read as one.
    got = lab.exchange(_post("ok.allowed.test", b"hello", "Content-Length: 5\r\n") + hidden)
    assert statuses(got) == [200, 403]
    assert b"POST / HTTP/1.1:ok.allowed.test:5" in got
    assert b"meta.allowed.test" in got
    # Chunked, with an extension and a trailer: both are dropped on the way (the server
    # sees the 15 bytes of "5 hello 0"), and the request after the last chunk is checked.
    chunked = b"5;x=1\r\nhello\r\n0\r\nX-T: y\r\n\r\n"
    got = lab.exchange(_post("ok.allowed.test", chunked, "Transfer-Encoding: chunked\r\n") + hidden)
    assert statuses(got) == [200, 403]
    assert b"POST / HTTP/1.1:ok.allowed.test:15" in got
    bad = b"5\r\nhello\r\nzz\r\n"  # not a chunk size: refused mid-body, nothing after it
    got = lab.exchange(_post("ok.allowed.test", bad, "Transfer-Encoding: chunked\r\n") + hidden)
    assert statuses(got) == [400]
    # Control: a body that merely contains request-like bytes is passed on as body.
    got = lab.exchange(
        _post("ok.allowed.test", hidden, f"Content-Length: {len(hidden)}\r\nConnection: close\r\n")
    )
    assert statuses(got) == [200]
    assert f"ok.allowed.test:{len(hidden)}".encode() in got


AMBIGUOUS = {
    "duplicate-host": b"GET http://ok.allowed.test/ HTTP/1.1\r\nHost: ok.allowed.test\r\n"
    b"Host: meta.allowed.test\r\n\r\n",
    "host-mismatch": b"GET http://ok.allowed.test/ HTTP/1.1\r\nHost: meta.allowed.test\r\n\r\n",
    "no-host": b"GET http://ok.allowed.test/ HTTP/1.1\r\n\r\n",
    "bare-lf": b"GET http://ok.allowed.test/ HTTP/1.1\r\nHost: ok.allowed.test\nX-A: b\r\n\r\n",
    "obs-fold": b"GET http://ok.allowed.test/ HTTP/1.1\r\nHost: ok.allowed.test\r\n"
    b"X-A: b\r\n c\r\n\r\n",
    "cl-and-te": b"POST http://ok.allowed.test/ HTTP/1.1\r\nHost: ok.allowed.test\r\n"
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-cl": b"POST http://ok.allowed.test/ HTTP/1.1\r\nHost: ok.allowed.test\r\n"
    b"Content-Length: 5\r\nContent-Length: 0\r\n\r\nhello",
    "te-not-chunked": b"POST http://ok.allowed.test/ HTTP/1.1\r\nHost: ok.allowed.test\r\n"
    b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "space-before-colon": b"GET http://ok.allowed.test/ HTTP/1.1\r\n"
    b"Host : meta.allowed.test\r\nHost: ok.allowed.test\r\n\r\n",
    "control-in-target": b"GET http://ok.allowed.test/\x00 HTTP/1.1\r\n"
    b"Host: ok.allowed.test\r\n\r\n",
    "control-in-value": b"GET http://ok.allowed.test/ HTTP/1.1\r\nHost: ok.allowed.test\r\n"
    b"X-A: a\x00b\r\n\r\n",
    "tab-in-request-line": b"GET\thttp://ok.allowed.test/ HTTP/1.1\r\n"
    b"Host: ok.allowed.test\r\n\r\n",
    "bare-cr": b"GET http://ok.allowed.test/ HTTP/1.1\r\nHost: ok.allowed.test\rX-A: b\r\n\r\n",
    "connection-drops-length": b"POST http://ok.allowed.test/ HTTP/1.1\r\n"
    b"Host: ok.allowed.test\r\nContent-Length: 41\r\nConnection: content-length\r\n\r\n"
    b"GET / HTTP/1.1\r\nHost: meta.allowed.test\r\n\r\n",
    "connection-drops-host": b"GET http://ok.allowed.test/ HTTP/1.1\r\n"
    b"Host: ok.allowed.test\r\nConnection: Host\r\n\r\n",
    "userinfo": b"GET http://ok.allowed.test@meta.allowed.test/ HTTP/1.1\r\n"
    b"Host: meta.allowed.test\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(AMBIGUOUS))
def test_ambiguous_requests_get_400_and_reach_nothing(lab: Lab, case: str) -> None:
    before = len(lab.hits("peer"))
    got = lab.exchange(AMBIGUOUS[case])
    assert statuses(got) == [400], got
    assert len(lab.hits("peer")) == before  # no upstream connection was even opened
    # Control: the same request made unambiguous passes.
    assert statuses(lab.exchange(get("ok.allowed.test"))) == [200]
    assert len(lab.hits("peer")) == before + 1


def test_ambiguity_in_a_later_request_is_caught_too(lab: Lab) -> None:
    got = lab.exchange(get("ok.allowed.test") + AMBIGUOUS["duplicate-host"])
    assert statuses(got) == [200, 400]


def test_connect_is_strict(lab: Lab) -> None:
    head, data = lab.tunnel("ok.allowed.test:443", "meta.allowed.test")  # SNI differs
    assert head.startswith(b"HTTP/1.1 200")
    assert data == b""
    head, _ = lab.tunnel(
        "ok.allowed.test:443", "ok.allowed.test", extra="Host: ok.allowed.test\r\nHost: x.test\r\n"
    )
    assert head.startswith(b"HTTP/1.1 400")
    head, _ = lab.tunnel(
        "ok.allowed.test:443", "ok.allowed.test", extra="Host: meta.allowed.test\r\n"
    )
    assert head.startswith(b"HTTP/1.1 400")
    head, _ = lab.tunnel("ok.allowed.test:80", "ok.allowed.test")
    assert head.startswith(b"HTTP/1.1 403")
    head, data = lab.tunnel(
        "ok.allowed.test:443", "ok.allowed.test", extra="Host: ok.allowed.test:443\r\n"
    )
    assert head.startswith(b"HTTP/1.1 200")  # control
    assert data.startswith(f"peer-tls:{PEER}:".encode())


# --- root's writes where the proxy's uid can plant links ---------------------------------


def _as_proxy_uid(code: str, *args: str, fd: int) -> None:
    """Run ``code`` as the proxies' uid holding ``fd``, as the proxy holds its directory."""
    subprocess.run(
        [GUEST_PYTHON, "-I", "-c", code, str(fd), *args],
        check=True, user=PROXY_UID, group=PROXY_UID, extra_groups=[], pass_fds=(fd,), timeout=30,
    )  # fmt: skip


def test_root_does_not_write_through_links_the_proxy_uid_planted(tmp_path: Path) -> None:
    mgr = NetworkManager(Settings.from_env({"IRONCLAW_HOME": str(tmp_path)}), proxy_uid=PROXY_UID)
    try:
        policy = NetworkPolicy(
            allow_domains=("allowed.test",), allow=("10.9.0.0/16:443", "10.8.0.1:53/udp")
        )
        path = mgr._write_proxy_config("planted", policy)  # control: a plain write works
        doc = json.loads(path.read_bytes())
        # The sandbox's tcp address rules may be used through the proxy too; udp ones not.
        assert doc["allow_addresses"] == [{"network": "10.9.0.0/16", "port": 443}]
        assert path.stat().st_uid == 0
        assert path.parent.stat().st_uid == PROXY_UID
        target = tmp_path / "root-only"
        target.write_text("precious")
        # The proxy's uid plants links at every name root used to write to.
        plant = (
            "import os, sys; d, t = int(sys.argv[1]), sys.argv[2]\n"
            "for n in ('proxy.json', 'proxy.json.tmp'):\n"
            "    try: os.unlink(n, dir_fd=d)\n"
            "    except FileNotFoundError: pass\n"
            "    os.symlink(t, n, dir_fd=d)\n"
        )
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _as_proxy_uid(plant, str(target), fd=dfd)
        finally:
            os.close(dfd)
        assert os.path.islink(path)
        mgr._write_proxy_config("planted", NetworkPolicy(allow_domains=("other.test",)))
        assert target.read_text() == "precious"
        assert not os.path.islink(path)
        assert b"other.test" in path.read_bytes()
        assert os.path.islink(path.parent / "proxy.json.tmp")  # left alone, not followed
        # A link in place of the directory itself is refused, not followed.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        real = path.parent
        real.rename(tmp_path / "moved")
        real.symlink_to(elsewhere)
        with pytest.raises(NetworkError, match="must be a real directory"):
            mgr._write_proxy_config("planted", policy)
        assert list(elsewhere.iterdir()) == []
    finally:
        mgr.close()
