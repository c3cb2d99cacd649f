"""Bearer tokens: random, shown once, stored as SHA-256 (a 256-bit random token needs no slow hash)."""

from __future__ import annotations

import hashlib
import re
import secrets

from tuneforge.errors import UserError

USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(store, user: str, expires_at: float | None = None) -> str:
    if not USER.match(user):
        raise UserError(f"--user {user!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    token = "tf_" + secrets.token_urlsafe(32)
    store.add_token(user, token_hash(token), expires_at)
    return token


def user_for(store, authorization: str | None) -> str | None:
    """The user of an `Authorization: Bearer <token>` header, or None (also for a revoked or expired token:
    checked in the database on every request, so a revocation holds at once)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return store.user_for_hash(token_hash(token.strip()))
