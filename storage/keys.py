"""Content-addressed cache keys.

A stage's key is a hash of its inputs' keys and its own settings, so equal inputs and
settings always name the same output, and any change names a new one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

KEY_LENGTH = 20  # hex characters: 80 bits, ample for a store's worth of entries


def canonical_json(payload: Any) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def content_key(kind: str, payload: dict[str, Any]) -> str:
    digest = hashlib.sha256(canonical_json({"kind": kind, **payload}).encode()).hexdigest()
    return f"{kind}-{digest[:KEY_LENGTH]}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
