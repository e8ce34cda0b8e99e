"""IronClaw on many hosts: one node actor per Ray node, placement, routing, node loss.

Ray is an optional extra (``pip install ironclaw[ray]``): only :mod:`.cluster` imports it,
and only when a cluster is opened, so a single-host install never needs it. See
docs/CLUSTER.md.
"""
