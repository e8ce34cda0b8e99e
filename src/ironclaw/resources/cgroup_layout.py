"""Which cgroup hierarchy carries each controller on this host (v1, v2 or hybrid).

Read from ``/proc/self/mountinfo`` once per manager; pure apart from reading the cgroup2
root's ``cgroup.controllers``, so every host shape is tested from fixed mountinfo text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal, NamedTuple

#: Without these the sandbox's limits could not be enforced, so create() refuses.
REQUIRED_CONTROLLERS: Final = ("memory", "pids", "cpu")
#: v1 only: cpuacct for cpu time, freezer for a race-free kill. v2 has both built in.
OPTIONAL_CONTROLLERS: Final = ("cpuacct", "freezer")
_WANTED: Final = REQUIRED_CONTROLLERS + OPTIONAL_CONTROLLERS
_V2_BUILTIN: Final = frozenset({"cpuacct", "freezer"})


class Hierarchy(NamedTuple):
    """One mounted cgroup tree and the controllers we use from it."""

    version: Literal[1, 2]
    mount: Path
    controllers: frozenset[str]


class CgroupLayout(NamedTuple):
    """What this host offers: controller -> hierarchy, and why the rest is unusable."""

    controllers: dict[str, Hierarchy]
    unusable: dict[str, str]

    @property
    def hierarchies(self) -> tuple[Hierarchy, ...]:
        """The distinct hierarchies in use, in a stable order."""
        seen: dict[Path, Hierarchy] = {}
        for name in _WANTED:
            h = self.controllers.get(name)
            if h is not None:
                seen.setdefault(h.mount, h)
        return tuple(seen.values())

    @property
    def mode(self) -> Literal["v1", "v2", "hybrid", "none"]:
        versions = {h.version for h in self.hierarchies}
        if not versions:
            return "none"
        if versions == {1}:
            return "v1"
        return "v2" if versions == {2} else "hybrid"

    @property
    def missing_required(self) -> dict[str, str]:
        return {c: self.unusable[c] for c in REQUIRED_CONTROLLERS if c in self.unusable}

    @property
    def usable(self) -> bool:
        return not self.missing_required


class _Mount(NamedTuple):
    fstype: str
    mount_point: Path
    super_options: frozenset[str]
    read_only: bool


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[_Mount]:
    """The cgroup and cgroup2 mounts in ``/proc/<pid>/mountinfo`` text, in mount order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 4:
            continue
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        mount_opts = set(fields[5].split(","))
        super_opts = frozenset(fields[sep + 3].split(","))
        mounts.append(
            _Mount(
                fstype=fstype,
                mount_point=Path(_unescape(fields[4])),
                super_options=super_opts,
                read_only="ro" in mount_opts or "ro" in super_opts,
            )
        )
    return mounts


def detect_layout(mountinfo_text: str) -> CgroupLayout:
    """Map each controller we want to the hierarchy that carries it, with reasons for gaps.

    v1 wins for a controller bound to a v1 hierarchy (the kernel then hides it from v2);
    otherwise the controller must be listed in the cgroup2 mount's ``cgroup.controllers``.
    """
    controllers: dict[str, Hierarchy] = {}
    unusable: dict[str, str] = {}
    mounts = parse_mountinfo(mountinfo_text)
    v2_mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
    v2_available: frozenset[str] = frozenset()
    if v2_mount is not None:
        try:
            v2_available = frozenset(
                (v2_mount.mount_point / "cgroup.controllers").read_text().split()
            )
        except OSError:
            v2_available = frozenset()

    for name in _WANTED:
        v1 = next((m for m in mounts if m.fstype == "cgroup" and name in m.super_options), None)
        if v1 is not None:
            if v1.read_only:
                unusable[name] = f"cgroup v1 hierarchy {v1.mount_point} is mounted read-only"
                continue
            bound = frozenset(o for o in v1.super_options if o in _WANTED)
            controllers[name] = Hierarchy(1, v1.mount_point, bound)
            continue
        if v2_mount is None:
            unusable[name] = "no cgroup v1 hierarchy carries it and no cgroup2 is mounted"
        elif v2_mount.read_only:
            unusable[name] = f"cgroup2 at {v2_mount.mount_point} is mounted read-only"
        elif name in _V2_BUILTIN or name in v2_available:
            continue  # assigned below, once the v2 set is known
        else:
            unusable[name] = (
                f"not bound to a cgroup v1 hierarchy and not in {v2_mount.mount_point}"
                "/cgroup.controllers (bound elsewhere, or disabled on the kernel command line)"
            )

    if v2_mount is not None and not v2_mount.read_only:
        v2_names = frozenset(n for n in _WANTED if n not in controllers and n not in unusable)
        # cpuacct/freezer are only worth a v2 directory if a real v2 controller is there.
        if v2_names - _V2_BUILTIN:
            v2 = Hierarchy(2, v2_mount.mount_point, v2_names)
            for n in v2_names:
                controllers[n] = v2
        else:
            for n in v2_names:
                unusable[n] = "no controller of ours is on cgroup2 here; v1 has no such hierarchy"
    return CgroupLayout(controllers=controllers, unusable=unusable)
