"""Proxy Basic authentication (RFC 9110 §11.7.1 Proxy-Authorization, RFC 7617 Basic).

A relay shared by many data planes must know who is asking before it opens a
tunnel. Kong (`proxy_server = http://user:pass@host:port`), decK and grpc-go all
send `Proxy-Authorization: Basic ...` up front, so Basic is the one scheme that
matters; Kong never answers a 407 challenge, it just retries later.

Sans-IO: `BasicAuth` is fed the raw header value and the current monotonic time
and answers with a user name or an `AuthError`. It opens no sockets and starts no
tasks. The server is expected to:

- call `cached(header, now)` on the event loop: a dictionary look-up keyed by an
  HMAC of the header, so a client that sends the same header on every tunnel (Kong
  does) pays for one password verification per `CACHE_TTL`, not one per tunnel;
- otherwise run `verify(header, now)` in a thread executor, because argon2 is slow
  on purpose (tens of milliseconds and tens of MiB per call with the library
  defaults). `verify` is thread-safe: the cache is the only shared mutable state
  and it sits behind a lock.

Credentials never leave this module: `AuthError.detail` is always one of a fixed
set of messages, so it may be logged and sent in a 407 body; no exception carries
the header, the user name, the password or a decoding error that would quote them
(decoding errors are caught and replaced, not chained). The cache holds HMACs of
headers and user names, never a password or a header.

An unknown user and a wrong password fail in the same way, with the same message
and the same work: an unknown user is checked against a dummy argon2 hash built
with the same parameters as the configured ones.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

import argon2
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = [
    "CACHE_TTL",
    "CHALLENGE",
    "MAX_CACHE",
    "REALM",
    "AuthError",
    "AuthReason",
    "BasicAuth",
    "Credential",
    "hash_password",
]

REALM: Final = "konnect-relay"

# RFC 9110 §11.7.1: a 407 carries Proxy-Authenticate; RFC 7617 §2.1: the charset
# parameter announces that user and password are sent as UTF-8.
CHALLENGE: Final[tuple[tuple[str, str], ...]] = (
    ("Proxy-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"'),
)

# A relay serves tens to hundreds of data planes, each sending one header; 1024
# distinct live headers is far above that and bounds the memory an authenticated
# client can make the relay hold by varying its header (the canonical-base64 rule
# below leaves each credential exactly one spelling, bar scheme case and spaces).
MAX_CACHE: Final = 1024

# Seconds a verified header stays trusted without a new argon2 check. A removed
# user is dropped on reload (a reload builds a new BasicAuth with an empty cache);
# within one configuration the TTL only limits how long a cache entry lives.
CACHE_TTL: Final = 300.0

AuthReason = Literal["auth_missing", "auth_malformed", "auth_scheme", "auth_failed"]


class AuthError(Exception):
    """The request does not carry acceptable proxy credentials (answer 407).

    `reason` is one of a fixed set (`AuthReason`), usable as a metric label.
    `detail` is one of a fixed set of messages: it never contains the user name,
    the password or the encoded credentials, so it is safe to log and to send.
    """

    reason: AuthReason
    detail: str

    def __init__(self, reason: AuthReason, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def hash_password(password: str) -> str:
    """An argon2id encoded hash of `password` for `auth.basic.users[].password_hash`.

    Uses argon2-cffi's defaults (RFC 9106 §4 second recommended option: t=3,
    m=64 MiB, p=4), which is what the relay expects every hash to cost.
    """
    _check_password(password)
    return argon2.PasswordHasher().hash(password)


# RFC 9106 §3.1 / the PHC string format as argon2 writes it:
#   $argon2id$v=19$m=<KiB>,t=<passes>,p=<lanes>$<salt b64>$<tag b64>
# Only argon2id (RFC 9106 §4: the recommended variant) and version 0x13.
_ARGON2ID_HASH: Final = re.compile(
    r"\$argon2id\$v=19\$m=([1-9][0-9]{0,9}),t=([1-9][0-9]{0,9}),p=([1-9][0-9]{0,7})"
    r"\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)
_HASH_FORMAT: Final = (
    "password_hash must be an argon2id hash "
    "($argon2id$v=19$m=<KiB>,t=<passes>,p=<lanes>$<salt>$<hash>)"
)
MIN_SALT_BYTES: Final = 8  # RFC 9106 §3.1: salt length at least 8 bytes
MIN_TAG_BYTES: Final = 16  # shorter tags are not something hash_password makes

# RFC 7617 §2: "The user-id and password MUST NOT contain any control characters";
# RFC 8265 (the profiles RFC 7617 points to for UTF-8) excludes C1 controls too.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")


def _b64_unpadded(text: str) -> bytes | None:
    """Decode the unpadded base64 that argon2 writes, or None."""
    try:
        return binascii.a2b_base64(text + "=" * (-len(text) % 4), strict_mode=True)
    except binascii.Error:
        return None


def _check_hash(encoded: str) -> None:
    m = _ARGON2ID_HASH.fullmatch(encoded)
    if m is None:
        raise ValueError(_HASH_FORMAT)
    memory, _time, lanes = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if memory < 8 * lanes:
        # RFC 9106 §3.1: m is at least 8*p KiB; argon2 would refuse at verification.
        raise ValueError("password_hash: memory cost m must be at least 8 x parallelism p")
    salt, tag = _b64_unpadded(m.group(4)), _b64_unpadded(m.group(5))
    if salt is None or tag is None:
        raise ValueError(_HASH_FORMAT + ": salt or hash is not base64")
    if len(salt) < MIN_SALT_BYTES or len(tag) < MIN_TAG_BYTES:
        raise ValueError(
            f"password_hash: salt must be at least {MIN_SALT_BYTES} bytes "
            f"and hash at least {MIN_TAG_BYTES} bytes"
        )
    try:
        argon2.extract_parameters(encoded)
    except InvalidHashError:
        raise ValueError(_HASH_FORMAT) from None


def _check_password(password: str) -> None:
    if not password:
        raise ValueError("password must not be empty")
    if _CONTROL.search(password):
        # Such a password could never be sent (see parse); the usual cause is a
        # trailing newline read from a file.
        raise ValueError("password must not contain control characters (a trailing newline?)")
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("password is not valid Unicode text") from None


def _check_user(user: str) -> None:
    if not user:
        raise ValueError("user name must not be empty")
    if ":" in user:
        raise ValueError("user name must not contain ':' (RFC 7617 §2)")
    if _CONTROL.search(user):
        raise ValueError("user name must not contain control characters")
    try:
        user.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("user name is not valid Unicode text") from None


@dataclass(frozen=True, slots=True)
class Credential:
    """One user's secret: an argon2id hash, or a plaintext password that the
    config loader read from an environment variable or a file. Exactly one is set.
    Neither appears in the repr."""

    password_hash: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.password_hash is None) == (self.password is None):
            raise ValueError("a credential needs exactly one of password_hash and password")
        if self.password_hash is not None:
            _check_hash(self.password_hash)
        if self.password is not None:
            _check_password(self.password)


# What a configured user is checked against: an argon2 hash, or the SHA-256
# digest of a plaintext password (digests have equal length, so compare_digest
# runs in time independent of the password).
@dataclass(frozen=True, slots=True)
class _Secret:
    argon2_hash: str | None
    digest: bytes | None


def _digest(password: str) -> bytes:
    return hashlib.sha256(password.encode("utf-8")).digest()


# RFC 9110 §11.4 and §11.2:
#   credentials = auth-scheme [ 1*SP ( token68 / #auth-param ) ]
#   auth-scheme = token
#   token       = 1*tchar
#   tchar       = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." /
#                 "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
#   token68     = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
# RFC 7617 §2: Basic takes a token68, the base64 (RFC 4648 §4) of user-pass.
_CREDENTIALS: Final = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+)(?: +(.*))?", re.DOTALL)
_TOKEN68: Final = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")

_FAILED: Final = "invalid proxy credentials"


def _malformed(detail: str) -> AuthError:
    return AuthError("auth_malformed", detail)


class BasicAuth:
    """Checks Proxy-Authorization headers against a fixed set of users.

    Build a new one when the configuration changes; the cache starts empty.
    """

    __slots__ = ("_cache", "_cache_key", "_dummy_hash", "_hasher", "_lock", "_users")

    def __init__(self, users: Mapping[str, Credential]) -> None:
        if not users:
            raise ValueError("proxy authentication needs at least one user")
        secrets_by_user: dict[str, _Secret] = {}
        first_hash: str | None = None
        for user, credential in users.items():
            _check_user(user)
            if credential.password_hash is not None:
                secrets_by_user[user] = _Secret(credential.password_hash, None)
                first_hash = first_hash or credential.password_hash
            else:
                assert credential.password is not None
                secrets_by_user[user] = _Secret(None, _digest(credential.password))
        self._users: Final = secrets_by_user
        self._hasher: Final = argon2.PasswordHasher()
        # With any hashed user, every verification (unknown user, plaintext user)
        # also runs one argon2 verification at the same cost, so the time taken
        # says nothing about which users exist or how they are configured. Users
        # whose hashes use other parameters than the first one stay
        # distinguishable by timing; hash_password gives them all the same.
        self._dummy_hash: Final = (
            None
            if first_hash is None
            else argon2.PasswordHasher.from_parameters(argon2.extract_parameters(first_hash)).hash(
                secrets.token_hex(16)
            )
        )
        # Keys are HMACs under a per-instance random key: the cache holds no
        # credential material, and its keys cannot be matched against a
        # dictionary of headers computed elsewhere.
        self._cache_key: Final = secrets.token_bytes(32)
        self._cache: Final[dict[bytes, tuple[str, float]]] = {}
        self._lock: Final = threading.Lock()

    def parse(self, header: bytes | None) -> tuple[str, str]:
        """Split a Proxy-Authorization value into (user, password).

        Raises `AuthError` with reason auth_missing (no header), auth_scheme (a
        scheme other than Basic) or auth_malformed (anything else wrong).
        """
        if header is None:
            raise AuthError("auth_missing", "no Proxy-Authorization header")
        # RFC 9110 §5.5: a field value has no leading or trailing whitespace.
        value = header.strip(b" \t")
        if not value:
            raise _malformed("empty Proxy-Authorization header")
        m = _CREDENTIALS.fullmatch(value)
        if m is None:
            raise _malformed("Proxy-Authorization does not start with an authentication scheme")
        # RFC 9110 §11.1: auth-scheme is case-insensitive.
        if m.group(1).lower() != b"basic":
            raise AuthError("auth_scheme", "proxy authentication scheme is not Basic")
        token = m.group(2)
        if not token:
            raise _malformed("Basic credentials missing")
        if _TOKEN68.fullmatch(token) is None:
            raise _malformed("Basic credentials are not a single base64 token")
        decoded = _b64decode(token)
        if decoded is None:
            raise _malformed("Basic credentials are not valid base64")
        # Strict base64 still accepts non-zero bits after the last full byte
        # ("YR==" is "a" as much as "YQ==" is). One spelling per credential keeps
        # the cache from filling with copies of one user.
        if binascii.b2a_base64(decoded, newline=False) != token:
            raise _malformed("Basic credentials are not canonical base64")
        user_pass = _utf8(decoded)
        if user_pass is None:
            raise _malformed("Basic credentials are not UTF-8")
        if _CONTROL.search(user_pass):
            raise _malformed("Basic credentials contain control characters")
        # RFC 7617 §2: user-pass = user-id ":" password, and a user-id cannot
        # contain ":", so the first colon is the separator.
        user, colon, password = user_pass.partition(":")
        if not colon:
            raise _malformed("Basic credentials have no colon between user and password")
        if not user:
            raise _malformed("Basic credentials have an empty user name")
        return user, password

    def cached(self, header: bytes | None, now: float) -> str | None:
        """The user name if this exact header passed `verify` less than
        `CACHE_TTL` seconds before `now` (a monotonic clock), else None."""
        if not header:
            return None
        key = self._key(header)
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                return None
            user, expires = entry
            if now >= expires:
                del self._cache[key]
                return None
            return user

    def verify(self, header: bytes | None, now: float) -> str:
        """Parse and check the header; return the user name and remember the
        header until `now + CACHE_TTL`. Slow (argon2): run it off the event loop.

        Raises `AuthError`; an unknown user and a wrong password both give
        auth_failed with the same message.
        """
        user, password = self.parse(header)
        assert header is not None  # parse raised otherwise
        secret = self._users.get(user)
        if secret is None:
            self._burn(password)
            raise AuthError("auth_failed", _FAILED)
        if secret.argon2_hash is not None:
            ok = self._argon2_verify(secret.argon2_hash, password)
        else:
            self._burn(password)
            assert secret.digest is not None
            ok = hmac.compare_digest(_digest(password), secret.digest)
        if not ok:
            raise AuthError("auth_failed", _FAILED)
        self._remember(header, user, now)
        return user

    def _argon2_verify(self, encoded: str, password: str) -> bool:
        try:
            return self._hasher.verify(encoded, password)
        except (VerificationError, InvalidHashError):
            return False

    def _burn(self, password: str) -> None:
        """Spend what checking a password against a configured hash would cost."""
        if self._dummy_hash is not None:
            self._argon2_verify(self._dummy_hash, password)
        else:
            hmac.compare_digest(_digest(password), bytes(32))

    def _key(self, header: bytes) -> bytes:
        return hmac.digest(self._cache_key, header, "sha256")

    def _remember(self, header: bytes, user: str, now: float) -> None:
        key = self._key(header)
        with self._lock:
            self._cache.pop(key, None)
            self._cache[key] = (user, now + CACHE_TTL)
            # Every entry lives CACHE_TTL, so the first inserted (dicts keep
            # insertion order) is the first to expire: drop from the front.
            while len(self._cache) > MAX_CACHE:
                del self._cache[next(iter(self._cache))]


def _b64decode(token: bytes) -> bytes | None:
    # Returns None instead of raising so no binascii.Error, whose message may
    # quote input, ends up as the context of an AuthError.
    try:
        return binascii.a2b_base64(token, strict_mode=True)
    except binascii.Error:
        return None


def _utf8(data: bytes) -> str | None:
    # UnicodeDecodeError carries the undecodable bytes; keep it out of AuthError.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
