"""Tests for relay.auth: a table of malformed Proxy-Authorization values, hashed and
plaintext credentials, the verification cache, and property tests that no
credential ever shows up in an error."""

from __future__ import annotations

import base64
import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import argon2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.auth import (
    CACHE_TTL,
    CHALLENGE,
    MAX_CACHE,
    REALM,
    AuthError,
    BasicAuth,
    Credential,
    hash_password,
)

# Hashes for tests are built once, with the cheapest parameters argon2 allows;
# hash_password itself uses the library defaults (tested once, below).
CHEAP = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
ALICE_HASH = CHEAP.hash("alice-secret")
ZOE_HASH = CHEAP.hash("pässwörd ☃")

USERS = {
    "alice": Credential(password_hash=ALICE_HASH),
    "bob": Credential(password="bob-plain"),
    "zoë": Credential(password_hash=ZOE_HASH),
}
AUTH = BasicAuth(USERS)

FAILED = ("auth_failed", "invalid proxy credentials")


def basic(user_pass: str | bytes, scheme: bytes = b"Basic") -> bytes:
    raw = user_pass.encode() if isinstance(user_pass, str) else user_pass
    return scheme + b" " + base64.b64encode(raw)


def raises(auth: BasicAuth, header: bytes | None, now: float = 0.0) -> AuthError:
    with pytest.raises(AuthError) as info:
        auth.verify(header, now)
    return info.value


# --- parsing ---------------------------------------------------------------------

VALID = [
    pytest.param(basic("alice:alice-secret"), ("alice", "alice-secret"), id="plain"),
    pytest.param(basic("alice:alice-secret", b"basic"), ("alice", "alice-secret"), id="lower"),
    pytest.param(basic("alice:alice-secret", b"BASIC"), ("alice", "alice-secret"), id="upper"),
    pytest.param(b"Basic   " + base64.b64encode(b"alice:x"), ("alice", "x"), id="several-spaces"),
    pytest.param(b" \t" + basic("alice:x") + b" \t", ("alice", "x"), id="surrounding-ows"),
    pytest.param(basic("alice:pa:ss:"), ("alice", "pa:ss:"), id="colon-in-password"),
    pytest.param(basic("alice:"), ("alice", ""), id="empty-password"),
    pytest.param(basic("zoë:pässwörd ☃"), ("zoë", "pässwörd ☃"), id="utf-8"),
    pytest.param(basic("u:p#@/%40"), ("u", "p#@/%40"), id="url-ish-password"),
    pytest.param(b"Basic dTpw", ("u", "p"), id="kong-example"),
]


@pytest.mark.parametrize(("header", "expected"), VALID)
def test_parse_valid(header: bytes, expected: tuple[str, str]) -> None:
    assert AUTH.parse(header) == expected


MALFORMED = [
    pytest.param(None, "auth_missing", id="no-header"),
    pytest.param(b"", "auth_malformed", id="empty"),
    pytest.param(b"  \t ", "auth_malformed", id="only-whitespace"),
    pytest.param(b"YWxpY2U6eA==", "auth_malformed", id="no-scheme-padded-blob"),
    pytest.param(b"dTpw", "auth_scheme", id="no-scheme-blob-reads-as-scheme"),
    pytest.param(b"Bearer abc.def.ghi", "auth_scheme", id="bearer"),
    pytest.param(b"Negotiate YIIBhgYGKwYBBQUCoIIBejCCAXa=", "auth_scheme", id="negotiate"),
    pytest.param(b'Digest username="alice", realm="x"', "auth_scheme", id="digest"),
    pytest.param(b"Basi dTpw", "auth_scheme", id="truncated-scheme"),
    pytest.param(b"Basic", "auth_malformed", id="basic-no-token"),
    pytest.param(b"Basic    ", "auth_malformed", id="basic-spaces-no-token"),
    pytest.param(b"Basic dTpw dTpw", "auth_malformed", id="two-tokens"),
    pytest.param(b"Basic dTpw,", "auth_malformed", id="trailing-comma"),
    pytest.param(b"Basic\tdTpw", "auth_malformed", id="tab-separator"),
    pytest.param(b"Basic\x00dTpw", "auth_malformed", id="nul-separator"),
    pytest.param(b"Basic dT\x00pw", "auth_malformed", id="nul-in-token"),
    pytest.param(b"Basic dTpw\r\n dTpw", "auth_malformed", id="obs-fold"),
    pytest.param(b"Basic \xc3\xa9dTpw", "auth_malformed", id="non-ascii-token"),
    pytest.param(b'Basic realm="x"', "auth_malformed", id="auth-param"),
    pytest.param(b"Basic =dTpw", "auth_malformed", id="leading-padding"),
    pytest.param(b"Basic dT=pw", "auth_malformed", id="padding-in-middle"),
    pytest.param(b"Basic YWxpY2U6eA", "auth_malformed", id="missing-padding"),
    pytest.param(b"Basic YWxpY2U6eA=", "auth_malformed", id="short-padding"),
    pytest.param(b"Basic YWxpY2U6eA===", "auth_malformed", id="excess-padding"),
    pytest.param(b"Basic YWxpY2U6eA==YQ==", "auth_malformed", id="two-blobs"),
    pytest.param(b"Basic YWxp-2U6eA==", "auth_malformed", id="base64url-alphabet"),
    pytest.param(b"Basic YWxp_2U6eA==", "auth_malformed", id="base64url-underscore"),
    pytest.param(b"Basic YWxp.2U6eA~~", "auth_malformed", id="token68-not-base64"),
    pytest.param(b"Basic YTp=", "auth_malformed", id="non-canonical-bits"),
    pytest.param(basic("alice"), "auth_malformed", id="no-colon"),
    pytest.param(basic(""), "auth_malformed", id="empty-user-pass"),
    pytest.param(basic(":secret"), "auth_malformed", id="empty-user"),
    pytest.param(basic("al\x00ice:x"), "auth_malformed", id="nul-in-user"),
    pytest.param(basic("alice:x\x00"), "auth_malformed", id="nul-in-password"),
    pytest.param(basic("alice:x\n"), "auth_malformed", id="lf-in-password"),
    pytest.param(basic("alice:\x1b[31m"), "auth_malformed", id="escape-in-password"),
    pytest.param(basic("alice:x\x7f"), "auth_malformed", id="del-in-password"),
    pytest.param(basic("alice:x\u0085"), "auth_malformed", id="c1-control"),
    pytest.param(basic(b"alice:\xff\xfe"), "auth_malformed", id="not-utf-8"),
    pytest.param(basic(b"alice:\xc3"), "auth_malformed", id="truncated-utf-8"),
    pytest.param(basic(b"alice:\xed\xa0\x80"), "auth_malformed", id="utf-8-surrogate"),
    pytest.param(basic(b"\xc0\xba:x"), "auth_malformed", id="overlong-utf-8-colon"),
]


@pytest.mark.parametrize(("header", "reason"), MALFORMED)
def test_parse_malformed(header: bytes | None, reason: str) -> None:
    with pytest.raises(AuthError) as info:
        AUTH.parse(header)
    exc = info.value
    assert exc.reason == reason
    assert exc.args == (exc.reason, exc.detail)
    assert str(exc) == f"{exc.reason}: {exc.detail}"
    # Nothing chained: a decoding error would quote the bytes it choked on.
    assert exc.__cause__ is None
    assert exc.__context__ is None
    # verify parses first and fails the same way, before any lookup.
    again = raises(AUTH, header)
    assert (again.reason, again.detail) == (exc.reason, exc.detail)


def test_reasons_and_details_are_a_small_fixed_set() -> None:
    seen: set[tuple[str, str]] = set()
    for param in MALFORMED:
        with pytest.raises(AuthError) as info:
            AUTH.parse(param.values[0])  # type: ignore[arg-type]
        seen.add((info.value.reason, info.value.detail))
    assert {reason for reason, _ in seen} == {"auth_missing", "auth_malformed", "auth_scheme"}
    # Each malformation is named, so an operator can tell a client's mistake.
    assert len({detail for _, detail in seen}) >= 10


def test_challenge() -> None:
    assert REALM == "konnect-relay"
    assert CHALLENGE == (("Proxy-Authenticate", 'Basic realm="konnect-relay", charset="UTF-8"'),)


# --- verification ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "user"),
    [
        pytest.param(basic("alice:alice-secret"), "alice", id="argon2"),
        pytest.param(basic("bob:bob-plain"), "bob", id="plaintext"),
        pytest.param(basic("zoë:pässwörd ☃"), "zoë", id="argon2-utf-8"),
        pytest.param(basic("bob:bob-plain", b"bAsIc"), "bob", id="scheme-case"),
    ],
)
def test_verify_right_password(header: bytes, user: str) -> None:
    assert BasicAuth(USERS).verify(header, 0.0) == user


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(basic("alice:alice-secreT"), id="argon2-wrong"),
        pytest.param(basic("alice:"), id="argon2-empty"),
        pytest.param(basic("alice:alice-secret "), id="argon2-trailing-space"),
        pytest.param(basic("bob:bob-plai"), id="plaintext-prefix"),
        pytest.param(basic("bob:bob-plainx"), id="plaintext-longer"),
        pytest.param(basic("bob:"), id="plaintext-empty"),
        pytest.param(basic("Alice:alice-secret"), id="user-case-matters"),
        pytest.param(basic("zoe:pässwörd ☃"), id="user-not-folded"),
        pytest.param(basic("alice:bob-plain"), id="other-users-password"),
        pytest.param(basic("mallory:alice-secret"), id="unknown-user"),
        pytest.param(basic("mallory:"), id="unknown-user-empty-password"),
    ],
)
def test_verify_wrong_password_or_unknown_user_fail_alike(header: bytes) -> None:
    exc = raises(BasicAuth(USERS), header)
    assert (exc.reason, exc.detail) == FAILED
    assert exc.args == FAILED
    assert exc.__context__ is None


@pytest.fixture
def argon2_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records the hash of every argon2 verification (the expensive step)."""
    calls: list[str] = []
    original = argon2.PasswordHasher.verify

    def counting(self: argon2.PasswordHasher, hash: str | bytes, password: str | bytes) -> bool:
        calls.append(hash if isinstance(hash, str) else hash.decode())
        return original(self, hash, password)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", counting)
    yield calls


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(basic("alice:alice-secret"), id="hashed-right"),
        pytest.param(basic("alice:wrong"), id="hashed-wrong"),
        pytest.param(basic("bob:bob-plain"), id="plaintext-right"),
        pytest.param(basic("bob:wrong"), id="plaintext-wrong"),
        pytest.param(basic("mallory:wrong"), id="unknown"),
    ],
)
def test_every_outcome_costs_one_argon2_verification(
    header: bytes, argon2_calls: list[str]
) -> None:
    """Timing must not tell unknown users from known ones, nor plaintext from
    hashed ones: each path runs exactly one argon2 verification, and the dummy
    one uses the configured hashes' parameters."""
    auth = BasicAuth(USERS)
    with contextlib.suppress(AuthError):
        auth.verify(header, 0.0)
    assert len(argon2_calls) == 1
    assert argon2.extract_parameters(argon2_calls[0]) == argon2.extract_parameters(ALICE_HASH)


def test_plaintext_only_config_runs_no_argon2(argon2_calls: list[str]) -> None:
    auth = BasicAuth({"bob": Credential(password="bob-plain")})
    assert auth.verify(basic("bob:bob-plain"), 0.0) == "bob"
    assert (raises(auth, basic("carol:bob-plain")).reason) == "auth_failed"
    assert (raises(auth, basic("bob:nope")).reason) == "auth_failed"
    assert argon2_calls == []


def test_hash_password_round_trip() -> None:
    encoded = hash_password("correct horse")
    assert encoded.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert hash_password("correct horse") != encoded  # salted
    auth = BasicAuth({"dp": Credential(password_hash=encoded)})
    assert auth.verify(basic("dp:correct horse"), 0.0) == "dp"
    assert raises(auth, basic("dp:correct horsE")).args == FAILED


@pytest.mark.parametrize("password", ["", "line\n", "tab\there", "nul\x00"])
def test_hash_password_refuses_unusable_passwords(password: str) -> None:
    with pytest.raises(ValueError):
        hash_password(password)


# --- configuration ---------------------------------------------------------------

_SALT, _TAG = ALICE_HASH.split("$")[-2:]


@pytest.mark.parametrize(
    "encoded",
    [
        pytest.param("", id="empty"),
        pytest.param("alice-secret", id="plaintext"),
        pytest.param(ALICE_HASH.replace("argon2id", "argon2i"), id="argon2i"),
        pytest.param(ALICE_HASH.replace("argon2id", "argon2d"), id="argon2d"),
        pytest.param(ALICE_HASH.replace("v=19", "v=16"), id="old-version"),
        pytest.param(ALICE_HASH.replace("$v=19", ""), id="no-version"),
        pytest.param(ALICE_HASH[:-30], id="truncated-hash"),
        pytest.param(ALICE_HASH.rsplit("$", 1)[0], id="no-hash"),
        pytest.param(ALICE_HASH.rsplit("$", 1)[0] + "$", id="empty-hash"),
        pytest.param(f"$argon2id$v=19$m=8,t=1,p=1$YWJj${_TAG}", id="short-salt"),
        pytest.param(f"$argon2id$v=19$m=8,t=1,p=1$${_TAG}", id="empty-salt"),
        pytest.param(f"$argon2id$v=19$m=8,t=1,p=1${_SALT}=${_TAG}", id="padded-salt"),
        pytest.param(f"$argon2id$v=19$m=8,t=1,p=1${_SALT}${_TAG[:-1]}!", id="bad-char"),
        pytest.param(f"$argon2id$v=19$m=8,t=1,p=1${_SALT[:-2]}A${_TAG}", id="salt-len-1-mod-4"),
        pytest.param(f"$argon2id$v=19$m=8,t=1,p=2${_SALT}${_TAG}", id="memory-below-8p"),
        pytest.param(f"$argon2id$v=19$m=8,t=0,p=1${_SALT}${_TAG}", id="zero-time"),
        pytest.param(f"$argon2id$v=19$m=08,t=1,p=1${_SALT}${_TAG}", id="leading-zero"),
        pytest.param(f"$argon2id$v=19$t=1,m=8,p=1${_SALT}${_TAG}", id="params-reordered"),
        pytest.param(ALICE_HASH + "$", id="trailing-dollar"),
        pytest.param(ALICE_HASH + "\n", id="trailing-newline"),
        pytest.param(" " + ALICE_HASH, id="leading-space"),
        pytest.param("$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW", id="bcrypt"),
    ],
)
def test_credential_rejects_malformed_hash(encoded: str) -> None:
    with pytest.raises(ValueError, match="password_hash") as info:
        Credential(password_hash=encoded)
    if len(encoded) > 20:
        assert encoded not in str(info.value)


def test_credential_accepts_well_formed_hashes() -> None:
    Credential(password_hash=ALICE_HASH)
    Credential(password_hash=ZOE_HASH)
    Credential(password_hash=argon2.PasswordHasher().hash("x"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({}, "exactly one", id="neither"),
        pytest.param({"password": "a", "password_hash": ALICE_HASH}, "exactly one", id="both"),
        pytest.param({"password": ""}, "empty", id="empty-password"),
        pytest.param({"password": "s3cret\n"}, "control", id="trailing-newline"),
        pytest.param({"password": "a\udcff"}, "Unicode", id="lone-surrogate"),
    ],
)
def test_credential_rejects(kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        Credential(**kwargs)
    assert "s3cret" not in str(info.value)


def test_credential_repr_hides_secrets() -> None:
    assert repr(Credential(password="hunter2hunter2")) == "Credential()"
    assert ALICE_HASH not in repr(Credential(password_hash=ALICE_HASH))
    assert "bob-plain" not in repr(AUTH)


@pytest.mark.parametrize(
    "users",
    [
        pytest.param({}, id="no-users"),
        pytest.param({"": Credential(password="x")}, id="empty-name"),
        pytest.param({"a:b": Credential(password="x")}, id="colon"),
        pytest.param({"a\tb": Credential(password="x")}, id="control"),
    ],
)
def test_basic_auth_rejects_unusable_users(users: dict[str, Credential]) -> None:
    with pytest.raises(ValueError):
        BasicAuth(users)


# --- cache -----------------------------------------------------------------------

ALICE = basic("alice:alice-secret")
BOB = basic("bob:bob-plain")


def test_cache_hit_after_success_only() -> None:
    auth = BasicAuth(USERS)
    assert auth.cached(ALICE, 0.0) is None
    assert auth.cached(None, 0.0) is None
    assert auth.verify(ALICE, 100.0) == "alice"
    assert auth.cached(ALICE, 100.0) == "alice"
    assert auth.cached(ALICE, 101.0) == "alice"
    # Keyed by the exact header: another spelling of the same credentials, or
    # another user's header, has not been verified.
    assert auth.cached(basic("alice:alice-secret", b"basic"), 101.0) is None
    assert auth.cached(BOB, 101.0) is None


def test_cache_not_filled_by_failures() -> None:
    auth = BasicAuth(USERS)
    wrong = basic("alice:wrong")
    raises(auth, wrong)
    raises(auth, basic("mallory:alice-secret"))
    raises(auth, b"Basic !")
    assert auth.cached(wrong, 0.0) is None
    assert auth.cached(basic("mallory:alice-secret"), 0.0) is None
    assert auth.cached(b"Basic !", 0.0) is None


def test_cache_failure_does_not_evict_success() -> None:
    auth = BasicAuth(USERS)
    auth.verify(BOB, 0.0)
    raises(auth, basic("bob:wrong"))
    assert auth.cached(BOB, 1.0) == "bob"


def test_cache_expires_after_ttl() -> None:
    auth = BasicAuth(USERS)
    auth.verify(BOB, 1000.0)
    assert auth.cached(BOB, 1000.0 + CACHE_TTL - 0.001) == "bob"
    assert auth.cached(BOB, 1000.0 + CACHE_TTL) is None
    # An expired entry is gone, not revived by an earlier clock reading.
    assert auth.cached(BOB, 1000.0) is None


def test_cache_refreshed_by_new_verification() -> None:
    auth = BasicAuth(USERS)
    auth.verify(BOB, 0.0)
    auth.verify(BOB, 200.0)
    assert auth.cached(BOB, CACHE_TTL + 100.0) == "bob"


def test_cache_size_is_bounded_oldest_first() -> None:
    count = MAX_CACHE + 10
    users = {f"user{i}": Credential(password=f"pw{i}") for i in range(count)}
    auth = BasicAuth(users)
    headers = [basic(f"user{i}:pw{i}") for i in range(count)]
    for i, header in enumerate(headers):
        auth.verify(header, i / count)
    now = 1.0
    assert [auth.cached(h, now) for h in headers[:10]] == [None] * 10
    assert [auth.cached(h, now) for h in headers[10:]] == [f"user{i}" for i in range(10, count)]


def test_verify_is_thread_safe() -> None:
    count = 200
    users = {f"u{i}": Credential(password=f"p{i}") for i in range(count)}
    users["hashed"] = Credential(password_hash=ALICE_HASH)
    auth = BasicAuth(users)
    headers = [basic(f"u{i}:p{i}") for i in range(count)] + [basic("hashed:alice-secret")]
    barrier = threading.Barrier(4)

    def work(offset: int) -> list[str]:
        barrier.wait(timeout=10)
        out = []
        for i in range(len(headers)):
            header = headers[(i + offset) % len(headers)]
            out.append(auth.verify(header, 0.0))
            assert auth.cached(header, 1.0) is not None
        return out

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, [0, 50, 100, 150]))
    expected = {f"u{i}" for i in range(count)} | {"hashed"}
    assert all(set(r) == expected for r in results)
    assert {auth.cached(h, 1.0) for h in headers} == expected


# --- no credential in any error --------------------------------------------------

# Every generated secret starts with "§", which no message of the module uses,
# so finding a secret (or its base64, which then starts with "wqc") in an error
# means it leaked rather than matched by chance.
_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=24)
secret_users = _text.filter(lambda s: ":" not in s).map(lambda s: "§" + s)
secret_passwords = _text.map(lambda s: "§" + s)


def _assert_clean(exc: AuthError, secrets: list[str]) -> None:
    shown = [str(exc), repr(exc), exc.detail, exc.reason, *map(str, exc.args)]
    for secret in secrets:
        for text in shown:
            assert secret not in text
    assert exc.__context__ is None
    assert exc.__cause__ is None


@settings(max_examples=150, deadline=None)
@given(user=secret_users, password=secret_passwords, other=secret_passwords)
def test_no_credential_in_any_error(user: str, password: str, other: str) -> None:
    auth = BasicAuth({user: Credential(password=password), "alice": USERS["alice"]})
    raw = f"{user}:{other}".encode()
    attempts = [
        raw,  # wrong password (or, rarely, right: then it must succeed)
        f"x{user}:{password}".encode(),  # unknown user
        f"alice:{password}".encode(),  # argon2 user, wrong password
        f"{user}{password}".encode(),  # no colon
        f"{user}:{password}\x00".encode(),  # control character
        raw + b"\xff",  # not UTF-8
    ]
    for attempt in attempts:
        blob = base64.b64encode(attempt).decode()
        header = b"Basic " + blob.encode()
        secrets = [user, password, other, blob]
        try:
            auth.verify(header, 0.0)
        except AuthError as exc:
            _assert_clean(exc, secrets)
        else:
            assert attempt == raw and other == password
        # Mangled encodings of the same credentials.
        for mangled in (blob[1:], blob + "=", blob[:-1] + "~", "Bearer " + blob):
            bad = mangled.encode() if mangled.startswith("Bearer") else b"Basic " + mangled.encode()
            with pytest.raises(AuthError) as info:
                auth.verify(bad, 0.0)
            _assert_clean(info.value, [*secrets, mangled])


@settings(max_examples=300, deadline=None)
@given(header=st.binary(max_size=64))
def test_arbitrary_header_raises_only_auth_error(header: bytes) -> None:
    try:
        AUTH.parse(header)
    except AuthError as exc:
        assert exc.reason in ("auth_malformed", "auth_scheme")
        assert exc.__context__ is None
