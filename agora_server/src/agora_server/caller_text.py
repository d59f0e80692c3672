"""Text that a caller chose (a run name, a node name, an error text, a field it sent) is clipped before
it reaches a reply or a log line: an admitted peer, or a stranger, must not be able to make us write
a megabyte per request."""

from __future__ import annotations

CALLER_TEXT_LIMIT = 200
"""Characters of caller-supplied text kept in a reply or a log line; enough to recognise the value."""


def clip(text: object, limit: int = CALLER_TEXT_LIMIT) -> str:
    """``text`` as a string of at most ``limit`` characters plus a marker saying how much was cut."""
    value = text if isinstance(text, str) else repr(text)
    if len(value) <= limit:
        return value
    return f"{value[:limit]}…(+{len(value) - limit} chars)"
