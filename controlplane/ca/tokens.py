"""Directory-mode bootstrap tokens: HMAC-SHA256 tokens bound to a namespace, a service
account and an expiry, minted by `meshline bootstrap --ca-dir` and verified by the
control plane with the same key. File I/O only in `load_or_create_token_key`, and only in
the CA directory.

Format: `mlt1.<payload>.<mac>`, both parts unpadded base64url; the payload is compact JSON
`{"exp":..,"iat":..,"ns":..,"sa":..}`, and the MAC is HMAC-SHA256 over `mlt1.<payload>`
with the 32-byte key in `<ca dir>/token-key` (hex, mode 0600). Replacing that file (then
restarting `meshline serve`, or letting it notice the change) revokes every token minted
with the old key.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import secrets
from pathlib import Path

from controlplane.ca import CAError
from controlplane.ca.core import _locked, _write_atomic
from controlplane.ca.identity import Identity

TOKEN_KEY_FILE = "token-key"
PREFIX = "mlt1"
DEFAULT_TOKEN_TTL = dt.timedelta(days=365)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_or_create_token_key(directory: Path) -> bytes:
    """The token signing key in `directory` (created, 0600, if absent)."""
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / TOKEN_KEY_FILE
    with _locked(directory):
        if not path.exists():
            _write_atomic(path, (secrets.token_hex(32) + "\n").encode(), 0o600)
        return read_token_key(path)


def read_token_key(path: Path) -> bytes:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CAError(f"{path} is readable by others (mode {mode:04o}); chmod 600 it")
    try:
        key = bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise CAError(f"{path}: not a hex token key ({exc})") from None
    if len(key) < 32:
        raise CAError(f"{path}: the token key must hold at least 32 bytes")
    return key


def _mac(key: bytes, signed: str) -> str:
    return _b64(hmac.new(key, signed.encode(), hashlib.sha256).digest())


def mint(key: bytes, identity: Identity, ttl: dt.timedelta = DEFAULT_TOKEN_TTL,
         now: dt.datetime | None = None, node: str | None = None) -> str:
    """A token for `identity`, valid for `ttl` from `now`; with `node`, it also proves that
    its holder is the node proxy of that node (which then gets the certificates of the
    ambient pods running there)."""
    if ttl <= dt.timedelta(0):
        raise CAError("the token lifetime must be positive")
    now = now or dt.datetime.now(dt.UTC)
    payload = {"exp": int((now + ttl).timestamp()), "iat": int(now.timestamp()),
               "ns": identity.namespace, "sa": identity.service_account}
    if node:
        payload["node"] = node
    signed = f"{PREFIX}.{_b64(json.dumps(payload, sort_keys=True, separators=(',', ':')).encode())}"
    return f"{signed}.{_mac(key, signed)}"


def is_meshline_token(token: str) -> bool:
    return token.startswith(PREFIX + ".")


def verify(key: bytes, token: str, now: dt.datetime | None = None) -> tuple[Identity, dt.datetime]:
    """(identity, expiry) of a valid token; CAError naming what is wrong (never the token)."""
    identity, expires, _node = verify_claims(key, token, now)
    return identity, expires


def verify_claims(key: bytes, token: str, now: dt.datetime | None = None
                  ) -> tuple[Identity, dt.datetime, str | None]:
    """(identity, expiry, node or None) of a valid token; CAError naming what is wrong."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise CAError("malformed token")
    signed = f"{parts[0]}.{parts[1]}"
    if not hmac.compare_digest(_mac(key, signed).encode(), parts[2].encode()):
        raise CAError("token signature does not verify (wrong key, or forged)")
    try:
        payload = json.loads(_unb64(parts[1]))
        identity = Identity(str(payload["ns"]), str(payload["sa"]))
        expires = dt.datetime.fromtimestamp(int(payload["exp"]), dt.UTC)
        node = str(payload["node"]) if payload.get("node") else None
    except (ValueError, KeyError, TypeError, binascii.Error, CAError):
        raise CAError("malformed token payload") from None
    now = now or dt.datetime.now(dt.UTC)
    if now >= expires:
        raise CAError(f"token expired at {expires.isoformat()}")
    return identity, expires, node


def token_key_path(directory: Path) -> Path:
    return Path(directory) / TOKEN_KEY_FILE


__all__ = ["DEFAULT_TOKEN_TTL", "TOKEN_KEY_FILE", "is_meshline_token", "load_or_create_token_key", "mint",
           "read_token_key", "token_key_path", "verify"]
