"""Tenants and API keys: a key is shown once at creation, stored as its SHA-256, and checked in constant time.

A key is `lf-` + 32 random bytes (URL-safe base64), so a SHA-256 without salt is enough: nobody can brute-force
256 random bits, and a plain digest lets the lookup be an index hit instead of a scan over salted hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Optional

from lorafleet.service.db import Database, now

KEY_PREFIX = "lf-"


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: its tenant, and whether the key is an admin key (sees every tenant's objects)."""

    tenant: str
    admin: bool = False


def hash_key(key: str) -> str:
    """The stored form of a key.

    Example:

    ```python
    >>> len(hash_key("lf-example"))
    64
    ```
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(db: Database, tenant: str, max_concurrent: Optional[int] = None, admin: bool = False,
               priority: Optional[int] = None) -> str:
    """Create (or update) a tenant and a new API key for it; return the key (it is not stored, only its hash).

    Args:
        db ([`~lorafleet.service.db.Database`]):
            The service's database.
        tenant (`str`):
            The tenant's name.
        max_concurrent (`int`, *optional*):
            How many of the tenant's jobs may run at once (default 1 for a new tenant; unchanged otherwise).
        admin (`bool`, *optional*, defaults to `False`):
            An admin key sees and manages every tenant's objects.
        priority (`int`, *optional*):
            The tenant's default job priority (higher runs first; default 0).

    Returns:
        `str`: the new key.

    Example:

    ```python
    >>> import tempfile
    >>> db = Database(f"sqlite:///{tempfile.mkdtemp()}/api.db")
    >>> key = create_key(db, "team-a", max_concurrent=2)
    >>> authenticate(db, key)
    Principal(tenant='team-a', admin=False)
    >>> authenticate(db, "lf-wrong") is None
    True
    ```
    """
    if not tenant or len(tenant) > 64 or not tenant.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError("--tenant: use 1-64 letters, digits, '-', '_' or '.'")
    if max_concurrent is not None and max_concurrent < 1:
        raise ValueError("--max-concurrent: must be at least 1")
    existing = db.row("SELECT * FROM tenants WHERE name = ?", [tenant])
    if existing is None:
        db.insert("tenants", {"name": tenant, "max_concurrent": max_concurrent or 1, "priority": priority or 0,
                              "created_at": now()})
    else:
        if max_concurrent is not None:
            db.execute("UPDATE tenants SET max_concurrent = ? WHERE name = ?", [max_concurrent, tenant])
        if priority is not None:
            db.execute("UPDATE tenants SET priority = ? WHERE name = ?", [priority, tenant])
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    db.insert("api_keys", {"key_hash": hash_key(key), "tenant": tenant, "admin": int(admin), "created_at": now()})
    return key


def authenticate(db: Database, key: Optional[str]) -> Optional[Principal]:
    """The principal of a key, or `None` when the key is missing or unknown.

    The row is found by the digest, then the digests are compared again with `hmac.compare_digest`, so the time
    taken never depends on how many leading characters of a guessed digest matched.
    """
    if not key:
        return None
    digest = hash_key(key.strip())
    row = db.row("SELECT key_hash, tenant, admin FROM api_keys WHERE key_hash = ?", [digest])
    if row is None or not hmac.compare_digest(row["key_hash"], digest):
        return None
    return Principal(tenant=row["tenant"], admin=bool(row["admin"]))
