"""Deterministic identifiers derived from what caused a thing.

Every write is idempotent by an id that comes from its cause: the same cause
always yields the same id, so re-processing after a crash is harmless.
"""

from __future__ import annotations

import hashlib

ID_HEX_CHARS = 32
_SEPARATOR = "\x1f"


def derive_id(*parts: object) -> str:
    """SHA-256 over the parts joined by a unit separator, shortened to 128 bits."""
    text = _SEPARATOR.join(map(str, parts))
    assert text.count(_SEPARATOR) == len(parts) - 1, "id part holds a separator"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]
