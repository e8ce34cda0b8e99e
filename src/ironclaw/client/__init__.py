"""The remote SDK: the in-process SDK's surface over the HTTP API (see docs/API.md).

``Sandbox`` (async) and ``SyncSandbox`` talk to ``ironclaw serve``; ``ApiClient``
reaches every route (tasks, approvals too). ``SandboxAPI`` is the protocol this SDK
and :mod:`ironclaw.sdk` both satisfy.
"""

from ironclaw.client.api import API_TOKEN_ENV, API_URL_ENV, ApiClient, ExecResult
from ironclaw.client.protocol import ExecResultLike, FilesAPI, SandboxAPI
from ironclaw.client.sandbox import RemoteCreating, RemoteFiles, Sandbox
from ironclaw.client.sync import (
    BlockingIterator,
    SyncCommands,
    SyncFiles,
    SyncNetwork,
    SyncPorts,
    SyncProcessHandle,
    SyncPty,
    SyncSandbox,
    SyncSnapshots,
    SyncTerminal,
    SyncWatch,
)

__all__ = [
    "API_TOKEN_ENV",
    "API_URL_ENV",
    "ApiClient",
    "BlockingIterator",
    "ExecResult",
    "ExecResultLike",
    "FilesAPI",
    "RemoteCreating",
    "RemoteFiles",
    "Sandbox",
    "SandboxAPI",
    "SyncCommands",
    "SyncFiles",
    "SyncNetwork",
    "SyncPorts",
    "SyncProcessHandle",
    "SyncPty",
    "SyncSandbox",
    "SyncSnapshots",
    "SyncTerminal",
    "SyncWatch",
]
