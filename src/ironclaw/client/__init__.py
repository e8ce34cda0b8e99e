"""The remote SDK: the in-process SDK's surface over the HTTP API (see docs/API.md)."""
