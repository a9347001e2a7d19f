"""Shims for upstream breakages (../shared/DESIGN.md §3), all in one place.

Each shim has a test in tests/test_compat.py that fails when the shim is no longer right or no longer needed.
"""

from __future__ import annotations

__all__: list[str] = []
