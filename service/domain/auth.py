"""API keys and who a caller is. Pure: generating and hashing a key, the roles.

A key is 256 random bits. It is stored as its SHA-256, not through a slow KDF: slow hashes protect
low-entropy secrets (passwords) from guessing, while a 256-bit random key cannot be guessed at any hash
rate, and a plain digest lets the key be found by one indexed lookup.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from enum import StrEnum

from service.domain import ids

KEY_PREFIX = "sk-cs-"
KEY_ID = "key"


class Role(StrEnum):
    USER = "user"
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: the tenant it acts as, its role, and the key it used (None: auth off)."""

    tenant: str
    role: Role
    key_id: str | None

    @property
    def actor(self) -> str:
        """Who an audit row names."""
        return self.key_id or f"tenant:{self.tenant}"


def new_key() -> tuple[str, str]:
    """(public key id, secret): the secret is shown once and never stored."""
    return ids.new_id(KEY_ID), KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
