"""API keys -> tenants. Keys are stored only as sha256 digests and compared in constant time."""

from __future__ import annotations

import hashlib
import hmac

from serve.config import TenantKey

LOCAL_TENANT = "local"


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    """Maps a presented API key to its tenant; with no keys configured, everyone is `local`."""

    def __init__(self, keys: list[TenantKey]):
        self._keys = [(k.key_sha256, k.tenant) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def tenant_for(self, presented: str | None) -> str | None:
        """The tenant owning `presented`, or None when the key is missing or unknown."""
        if not self.enabled:
            return LOCAL_TENANT
        if not presented:
            return None
        digest = hash_api_key(presented)
        tenant = None
        for known, owner in self._keys:  # no early exit: timing does not reveal which key matched
            if hmac.compare_digest(digest, known):
                tenant = owner
        return tenant
