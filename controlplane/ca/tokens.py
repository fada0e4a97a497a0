"""Directory-mode bootstrap tokens: HMAC-SHA256 tokens bound to a namespace, a service
account and an expiry, minted by `meshline bootstrap --ca-dir` and verified by the
control plane with the same key. File I/O only in `load_or_create_token_key`, and only in
the CA directory.

Format: `mlt1.<payload>.<mac>`, both parts unpadded base64url; the payload is compact JSON
`{"aud":"meshline-xds","exp":..,"iat":..,"ns":..,"sa":..}` (the audience says what the token
is for; a token without it, or for another purpose, is refused), and the MAC is HMAC-SHA256 over `mlt1.<payload>`
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
DEFAULT_TOKEN_TTL = dt.timedelta(hours=24)
AUDIENCE = "meshline-xds"
TOKENS_DIR = "tokens"
"""Token files `meshline bootstrap --ca-dir` writes under the CA directory (read by Envoy at
every xDS stream); `meshline serve` with the same CA directory renews them at half life."""


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
    payload: dict[str, object] = {"aud": AUDIENCE, "exp": int((now + ttl).timestamp()),
                                  "iat": int(now.timestamp()), "ns": identity.namespace,
                                  "sa": identity.service_account}
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
        audience = payload.get("aud")
    except (ValueError, KeyError, TypeError, binascii.Error, CAError):
        raise CAError("malformed token payload") from None
    if audience != AUDIENCE:
        raise CAError(f"token is not for {AUDIENCE!r} (audience {audience!r})")
    now = now or dt.datetime.now(dt.UTC)
    if now >= expires:
        raise CAError(f"token expired at {expires.isoformat()}")
    return identity, expires, node


def token_file(directory: Path, identity: Identity, node: str | None = None) -> Path:
    """Where `meshline bootstrap --ca-dir` keeps the token of `identity` (and node)."""
    name = f"{identity.namespace}.{identity.service_account}" + (f".{node}" if node else "")
    return Path(directory) / TOKENS_DIR / f"{name}.token"


def write_token_file(directory: Path, identity: Identity, ttl: dt.timedelta, node: str | None = None,
                     path: Path | None = None) -> Path:
    """Mint a token for `identity` into its token file (0600, atomically), by default under
    `directory`/tokens/ (renewed by `meshline serve`); returns the path."""
    key = load_or_create_token_key(directory)
    path = path or token_file(directory, identity, node)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_atomic(path, mint(key, identity, ttl, node=node).encode(), 0o600)  # no newline: sent as is
    return path


def renew_token_files(directory: Path, now: dt.datetime | None = None) -> list[Path]:
    """Re-mint every token file under `directory` that is past half its life and still valid
    under the current key (a token of a replaced key stays revoked). Returns those renewed."""
    now = now or dt.datetime.now(dt.UTC)
    folder = Path(directory) / TOKENS_DIR
    if not folder.is_dir():
        return []
    key = read_token_key(token_key_path(directory))
    renewed = []
    for path in sorted(folder.glob("*.token")):
        try:
            text = path.read_text().strip()
            identity, expires, node = verify_claims(key, text, now)
            issued = dt.datetime.fromtimestamp(int(json.loads(_unb64(text.split(".")[1]))["iat"]), dt.UTC)
        except (OSError, CAError, ValueError, KeyError, IndexError, binascii.Error):
            continue
        ttl = expires - issued
        if ttl > dt.timedelta(0) and now >= issued + ttl / 2:
            _write_atomic(path, mint(key, identity, ttl, now, node).encode(), 0o600)
            renewed.append(path)
    return renewed


def token_key_path(directory: Path) -> Path:
    return Path(directory) / TOKEN_KEY_FILE


__all__ = [
    "AUDIENCE",
    "DEFAULT_TOKEN_TTL",
    "TOKEN_KEY_FILE",
    "is_meshline_token",
    "load_or_create_token_key",
    "mint",
    "read_token_key",
    "renew_token_files",
    "token_file",
    "token_key_path",
    "verify",
    "write_token_file",
]
