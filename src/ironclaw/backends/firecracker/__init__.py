"""Firecracker microVM backend: request builders checked against Firecracker's spec,
the API client, the jailer layout, the VM's tap device and the backend itself."""

from ironclaw.backends.firecracker.backend import (
    FirecrackerBackend,
    SnapshotFiles,
    connect_agent,
    probe_firecracker,
)

__all__ = ["FirecrackerBackend", "SnapshotFiles", "connect_agent", "probe_firecracker"]
