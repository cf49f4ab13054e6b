"""Who is an agent: keys from AGENT_API_KEYS, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac

from server.settings import Secret, check_agent_keys

# A presented key longer than this is no agent key (they are short strings); it is not even hashed in full.
MAX_PRESENTED_KEY = 1024


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class AgentDirectory:
    """Maps an agent key to the agent's name without leaking timing (or length); weak keys stop start-up."""

    def __init__(self, keys: tuple[tuple[str, Secret], ...]) -> None:
        check_agent_keys(keys)
        # Only digests are kept: equal-length comparisons, and no raw key in this process's objects.
        self._keys = [(name, _digest((secret.reveal() or "").encode())) for name, secret in keys]

    def name_for(self, key: object) -> str | None:
        """The agent's name for a key, or None; every configured key is compared, always."""
        raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) and 0 < len(key) <= MAX_PRESENTED_KEY else None
        presented = _digest(raw if raw is not None else b"\x00not-a-key")
        found: str | None = None
        for name, expected in self._keys:
            if hmac.compare_digest(presented, expected) and raw is not None:
                found = name
        return found

    def __bool__(self) -> bool:
        return bool(self._keys)
