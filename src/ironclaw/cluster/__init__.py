"""IronClaw on many hosts: one node actor per Ray node, placement, routing, node loss.

Ray is an optional extra (``pip install ironclaw[ray]``): it is imported only when a
cluster is opened (:mod:`.cluster`) and inside a node actor (:mod:`.node`), so a
single-host install never needs it. See docs/CLUSTER.md.
"""
