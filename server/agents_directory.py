"""Who is an agent: keys from AGENT_API_KEYS, compared in constant time."""

from __future__ import annotations

import hmac

from server.settings import Secret


class AgentDirectory:
    """Maps an agent key to the agent's name without leaking timing."""

    def __init__(self, keys: tuple[tuple[str, Secret], ...]) -> None:
        self._keys = [(name, (secret.reveal() or "").encode()) for name, secret in keys]

    def name_for(self, key: object) -> str | None:
        """The agent's name for a key, or None; every configured key is compared, always."""
        presented = key.encode() if isinstance(key, str) else b""
        found: str | None = None
        for name, expected in self._keys:
            if hmac.compare_digest(presented, expected) and presented:
                found = name
        return found

    def __bool__(self) -> bool:
        return bool(self._keys)
