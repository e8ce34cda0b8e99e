"""IronClaw: run AI agents and untrusted code in isolated sandboxes.

This top-level module stays light (standard library only) because the guest agent
imports the package inside minimal sandboxes. The SDK lives in :mod:`ironclaw.sdk`.
"""

__version__ = "0.1.0"
