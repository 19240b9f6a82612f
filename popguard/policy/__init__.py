"""Policies: YAML rules in ``policies/``, matched per session (sans-I/O)."""
