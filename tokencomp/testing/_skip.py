"""The signal a conformance check gives when it does not apply."""

from __future__ import annotations

__all__ = ["SkipCheck"]


class SkipCheck(Exception):
    """Raised by a check that does not apply to the compressor given; the message is the reason."""
