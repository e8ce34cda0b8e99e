"""The remote SDK: the in-process SDK's surface over the HTTP API (see docs/API.md).

``Sandbox`` (async) and ``SyncSandbox`` talk to ``ironclaw serve``; ``ApiClient``
reaches every route (tasks, approvals too). ``SandboxAPI`` is the protocol this SDK
and :mod:`ironclaw.sdk` both satisfy.
"""

from ironclaw.client import sync
from ironclaw.client.api import API_TOKEN_ENV, API_URL_ENV, ApiClient, ExecResult
from ironclaw.client.protocol import ExecResultLike, FilesAPI, SandboxAPI
from ironclaw.client.sandbox import RemoteCreating, RemoteFiles, Sandbox
from ironclaw.client.sync import *  # noqa: F403  # the blocking twins: its __all__

__all__ = [
    "API_TOKEN_ENV",
    "API_URL_ENV",
    "ApiClient",
    "ExecResult",
    "ExecResultLike",
    "FilesAPI",
    "RemoteCreating",
    "RemoteFiles",
    "Sandbox",
    "SandboxAPI",
]
__all__ += sync.__all__
