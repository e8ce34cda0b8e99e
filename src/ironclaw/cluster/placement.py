"""Where a new sandbox goes: the live node with the most free capacity.

Pure: the node actors report their capacity (:class:`NodeCapacity`), the head keeps the
reports and picks with :func:`choose_node`. No Ray here, so the rule is unit-testable.
"""

from __future__ import annotations

from dataclasses import dataclass

from ironclaw.errors import SandboxError

__all__ = ["NODE_RESOURCE_PREFIX", "NodeCapacity", "choose_node"]

#: A Ray node takes part when started with a custom resource of this prefix:
#: ``ray start ... --resources '{"ironclaw_node_NAME": 1}'``; NAME is the node's name.
NODE_RESOURCE_PREFIX = "ironclaw_node_"


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
    nodes: list[NodeCapacity], memory_mib: int, *, node: str | None = None
) -> NodeCapacity:
    """The node for a sandbox with a ``memory_mib`` limit; ``node`` pins it to one node.

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
