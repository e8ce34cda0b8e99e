"""IronClaw as a service: the HTTP API of ``ironclaw serve`` (see docs/API.md)."""

from ironclaw.api.app import create_app

__all__ = ["create_app"]
