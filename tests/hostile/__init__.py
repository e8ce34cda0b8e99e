"""Hostile-guest tests: the host side of the channel facing a sandbox that breaks rules."""
