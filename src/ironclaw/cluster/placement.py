"""Where a new sandbox goes: the live node with the most free capacity.

Pure: the node actors report their capacity and labels (:class:`NodeCapacity`), the head
keeps the reports and picks with :func:`choose_node`. No Ray here, so the rule is
unit-testable.

Affinity lives in the spec's own labels: a label ``node/KEY: VALUE`` is a node selector
(:func:`node_selector`), so a sandbox with ``{"labels": {"node/gpu": "yes"}}`` goes only
to a node labelled ``gpu=yes``; the sandbox keeps the label, so listing by it finds the
sandboxes placed by it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ironclaw.errors import SandboxError

__all__ = [
    "NODE_RESOURCE_PREFIX",
    "SELECTOR_PREFIX",
    "NodeCapacity",
    "choose_node",
    "node_selector",
]

#: A Ray node takes part when started with a custom resource of this prefix:
#: ``ray start ... --resources '{"ironclaw_node_NAME": 1}'``; NAME is the node's name.
NODE_RESOURCE_PREFIX = "ironclaw_node_"
#: A sandbox label ``node/KEY`` asks for a node whose label KEY has the label's value.
SELECTOR_PREFIX = "node/"


def node_selector(labels: Mapping[str, str]) -> dict[str, str]:
    """The node labels a sandbox's own labels ask for (its ``node/KEY`` labels)."""
    return {k.removeprefix(SELECTOR_PREFIX): v for k, v in labels.items()
            if k.startswith(SELECTOR_PREFIX)}  # fmt: skip


@dataclass
class NodeCapacity:
    """What one node can still take, as its actor reported it (and the head then
    debited for the creates it sent since)."""

    name: str
    max_sandboxes: int
    sandboxes: int
    memory_mib: int  # the budget for sandboxes' memory limits on this node
    reserved_mib: int  # the memory limits of its live sandboxes
    alive: bool = True
    #: The node's labels: its Ray node labels and ``IRONCLAW_NODE_LABELS``.
    labels: dict[str, str] = field(default_factory=dict)

    def matches(self, selector: Mapping[str, str]) -> bool:
        return all(self.labels.get(k) == v for k, v in selector.items())

    @property
    def free_slots(self) -> int:
        return self.max_sandboxes - self.sandboxes

    @property
    def free_mib(self) -> int:
        return self.memory_mib - self.reserved_mib

    def fits(self, memory_mib: int) -> bool:
        return self.alive and self.free_slots >= 1 and self.free_mib >= memory_mib

    def score(self) -> float:
        """The scarcer of the two resources, as the fraction still free."""
        slots = self.free_slots / max(self.max_sandboxes, 1)
        memory = self.free_mib / max(self.memory_mib, 1)
        return min(slots, memory)


def choose_node(
    nodes: list[NodeCapacity],
    memory_mib: int,
    *,
    node: str | None = None,
    selector: Mapping[str, str] | None = None,
) -> NodeCapacity:
    """The node for a sandbox with a ``memory_mib`` limit; ``node`` pins it to one node,
    ``selector`` to the nodes with those labels.

    Among the nodes it fits on, the one with the largest free fraction of its scarcer
    resource wins (ties: the name, so placement is deterministic). Lost nodes never
    win; the error says why nothing fits.
    """
    if node is not None:
        named = [n for n in nodes if n.name == node]
        if not named:
            known = ", ".join(sorted(n.name for n in nodes)) or "none"
            raise SandboxError(f"no cluster node named {node!r} (nodes: {known})")
        if not named[0].alive:
            raise SandboxError(f"cluster node {node!r} is lost; choose another node or none")
        nodes = named
    if selector:
        wanted = ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))
        nodes = [n for n in nodes if n.matches(selector)]
        if not nodes:
            raise SandboxError(
                f"no cluster node has the labels {wanted}; label a node (ray start "
                "--labels, or IRONCLAW_NODE_LABELS in its environment) or drop the "
                f"sandbox's {SELECTOR_PREFIX}* labels"
            )
        if not any(n.alive for n in nodes):
            raise SandboxError(f"every cluster node labelled {wanted} is lost")
    fitting = [n for n in nodes if n.fits(memory_mib)]
    if not fitting:
        alive = [n for n in nodes if n.alive]
        if not alive:
            raise SandboxError("no live cluster node; start one (see docs/CLUSTER.md)")
        best = max(alive, key=lambda n: n.free_mib)
        raise SandboxError(
            f"no cluster node has room for a sandbox of {memory_mib} MiB: the freest has "
            f"{best.free_slots} slot(s) and {best.free_mib} MiB free; lower the memory "
            "limit, remove sandboxes or add a node"
        )
    return max(fitting, key=lambda n: (n.score(), n.free_mib, [-ord(c) for c in n.name]))
