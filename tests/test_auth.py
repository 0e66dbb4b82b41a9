"""Tests for twisted_novnc.front.auth: hmac tokens, column digests, token extraction, the secret
file."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from urllib.parse import parse_qs, parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twisted_novnc.__main__ import main
from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.front.auth import (
    DEFAULT_MAX_TOKEN_AGE,
    MAX_EXPIRES_AT,
    MAX_TOKEN_LENGTH,
    SecretFileError,
    TokenError,
    TokenExpired,
    TokenForbidden,
    TokenRequired,
    digest_matches,
    extract_token,
    mint_token,
    mint_token_command,
    parse_cookie_name,
    read_secret,
    strip_token,
    token_digest,
    verify_digest,
    verify_token,
)

SECRET = b"0123456789abcdef0123456789abcdef"
SESSION = "3f1c6a52-8a4e-4a55-9f53-0f6a0f3c2a10"
MODEST = settings(max_examples=60)

secrets = st.binary(min_size=16, max_size=64)
expiries = st.integers(min_value=1, max_value=MAX_EXPIRES_AT)


# --- hmac tokens ------------------------------------------------------------------------------


def test_token_opens_its_session_until_it_expires():
    """A minted token verifies for its session at any time before its expiry."""
    token = mint_token(SECRET, SESSION, 2_000_000_000)
    verify_token(SECRET, SESSION, token, now=1_999_999_999.9)


def test_token_expiring_beyond_max_age_is_forbidden():
    """A genuine token whose expiry lies more than max_age ahead of now is 4403 (it breaks the
    policy; minting the same again cannot help); at exactly max_age ahead it opens."""
    token = mint_token(SECRET, SESSION, 2_000_086_400)
    verify_token(SECRET, SESSION, token, now=2_000_000_000, max_age=86400)
    with pytest.raises(TokenForbidden, match="max_token_age") as e:
        verify_token(SECRET, SESSION, token, now=1_999_999_999, max_age=86400)
    assert e.value.refusal is Refusal.FORBIDDEN
    verify_token(SECRET, SESSION, token, now=0)  # no max_age: no bound


def test_forged_token_is_forbidden_whatever_its_age():
    """The MAC is checked before the age: a forged far-future token is plain 4403 forbidden."""
    token = mint_token(b"another-secret-of-16+", SESSION, MAX_EXPIRES_AT)
    with pytest.raises(TokenForbidden, match="does not match"):
        verify_token(SECRET, SESSION, token, now=0, max_age=60)


def test_token_is_url_safe_and_short():
    """The token is ``<expiry>.<mac>`` in URL-safe characters, fit for a query parameter."""
    token = mint_token(SECRET, SESSION, 2_000_000_000)
    expiry, _, mac = token.partition(".")
    assert expiry == "2000000000"
    assert len(mac) == 43
    assert set(token) <= set("0123456789.ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_")


def test_token_matches_the_documented_construction():
    """Any backend can mint a token from the recipe in the module docstring."""
    import base64
    import hmac

    message = f"tnovnc1:{len(SESSION)}:{SESSION}:1700000000".encode()
    mac = hmac.new(SECRET, message, hashlib.sha256).digest()
    expected = "1700000000." + base64.urlsafe_b64encode(mac).decode().rstrip("=")
    assert mint_token(SECRET, SESSION, 1700000000) == expected


def test_expired_token_is_4401():
    """At and after its expiry a genuine token is refused as expired (4401), not forbidden."""
    token = mint_token(SECRET, SESSION, 1000)
    for now in (1000, 1000.5, 10**9):
        with pytest.raises(TokenExpired) as e:
            verify_token(SECRET, SESSION, token, now=now)
        assert e.value.refusal is Refusal.TOKEN_EXPIRED
        assert (e.value.refusal.close_code, e.value.refusal.reason) == (4401, "token expired")


def test_missing_token_is_4401():
    """No token, or an empty one, is refused as required (4401)."""
    for token in (None, ""):
        with pytest.raises(TokenRequired) as e:
            verify_token(SECRET, SESSION, token, now=0)
        assert (e.value.refusal.close_code, e.value.refusal.reason) == (4401, "token required")


def test_other_sessions_token_is_forbidden():
    """A token minted for one session does not open another (4403)."""
    token = mint_token(SECRET, "session-a", 2000)
    with pytest.raises(TokenForbidden) as e:
        verify_token(SECRET, "session-b", token, now=0)
    assert (e.value.refusal.close_code, e.value.refusal.reason) == (4403, "forbidden")


def test_other_secrets_token_is_forbidden():
    """A token minted with another secret is forged (4403)."""
    token = mint_token(b"another secret, 16+ bytes", SESSION, 2000)
    with pytest.raises(TokenForbidden):
        verify_token(SECRET, SESSION, token, now=0)


def test_forged_expired_token_is_forbidden_not_expired():
    """The MAC is checked first, so a forged token is 4403 even when its time has passed."""
    mac = mint_token(SECRET, SESSION, 1000).partition(".")[2]
    with pytest.raises(TokenForbidden):
        verify_token(SECRET, SESSION, "999." + mac, now=5000)


def test_moving_digits_between_id_and_expiry_is_forbidden():
    """("a1", 23) and ("a", 123) are different messages: the id is length-prefixed."""
    mac = mint_token(SECRET, "a1", 23).partition(".")[2]
    with pytest.raises(TokenForbidden):
        verify_token(SECRET, "a", "123." + mac, now=0)
    mac = mint_token(SECRET, "ab", 12).partition(".")[2]
    with pytest.raises(TokenForbidden):
        verify_token(SECRET, "a", "12." + mac, now=0)


def test_malformed_tokens_are_forbidden():
    """Tokens not of the form ``<digits>.<43 base64url characters>`` are refused (4403)."""
    good = mint_token(SECRET, SESSION, 2000)
    mac = good.partition(".")[2]
    for token in [
        "garbage",
        "2000",
        "2000.",
        "." + mac,
        "02000." + mac,
        "+2000." + mac,
        "2_000." + mac,
        "\uff12\uff10\uff10\uff10." + mac,  # fullwidth digits: int() takes them
        "2000." + mac + "=",
        "2000." + mac[:-1],
        "2000." + mac + "A",
        " " + good,
        good + "\n",
        "1" * 19 + "." + mac,
    ]:
        with pytest.raises(TokenForbidden):
            verify_token(SECRET, SESSION, token, now=0)


def test_overlong_token_is_refused_unparsed():
    """A token over 512 characters is forbidden before any parsing or hashing."""
    with pytest.raises(TokenForbidden) as e:
        verify_token(SECRET, SESSION, "1" * (MAX_TOKEN_LENGTH + 1), now=0)
    assert "longer than" in e.value.detail


def test_non_canonical_base64_is_forbidden():
    """A last character that decodes to the same MAC bytes is still refused."""
    token = mint_token(SECRET, SESSION, 2000)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    # The last of 43 characters carries 4 bits: the low 2 bits of its index are padding.
    for other in range(last & ~3, (last & ~3) + 4):
        if other != last:
            with pytest.raises(TokenForbidden):
                verify_token(SECRET, SESSION, token[:-1] + alphabet[other], now=0)


def test_token_errors_are_refusals():
    """Each token error is a Refused, so the front end closes with its code unchanged."""
    for error, refusal in [
        (TokenRequired(), Refusal.TOKEN_REQUIRED),
        (TokenExpired("x"), Refusal.TOKEN_EXPIRED),
        (TokenForbidden("x"), Refusal.FORBIDDEN),
    ]:
        assert isinstance(error, TokenError) and isinstance(error, Refused)
        assert error.refusal is refusal


def test_mint_token_refuses_bad_arguments():
    """Short secrets, non-integer or out-of-range expiries are programming errors."""
    with pytest.raises(ValueError):
        mint_token(b"short", SESSION, 1)
    with pytest.raises(ValueError):
        mint_token(SECRET, SESSION, -1)
    with pytest.raises(ValueError):
        mint_token(SECRET, SESSION, MAX_EXPIRES_AT + 1)
    with pytest.raises(TypeError):
        mint_token(SECRET, SESSION, 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mint_token(SECRET, SESSION, True)


@MODEST
@given(secret=secrets, session_id=st.text(max_size=200), expires_at=expiries)
def test_tokens_round_trip(secret, session_id, expires_at):
    """Any session id and expiry: the token opens the session before, and is expired at, it."""
    token = mint_token(secret, session_id, expires_at)
    assert len(token) <= 62
    verify_token(secret, session_id, token, now=expires_at - 1)
    with pytest.raises(TokenExpired):
        verify_token(secret, session_id, token, now=expires_at)


@MODEST
@given(
    session_id=st.text(max_size=50),
    expires_at=expiries,
    data=st.data(),
)
def test_any_single_character_change_is_forbidden(session_id, expires_at, data):
    """Replacing any one character of a valid token makes it forbidden, never expired or valid."""
    token = mint_token(SECRET, session_id, expires_at)
    index = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    replacement = data.draw(st.characters().filter(lambda c: c != token[index]))
    changed = token[:index] + replacement + token[index + 1 :]
    with pytest.raises(TokenForbidden):
        verify_token(SECRET, session_id, changed, now=0)


@MODEST
@given(token=st.text(max_size=600), session_id=st.text(max_size=50), now=st.floats())
def test_verify_token_only_raises_token_errors(token, session_id, now):
    """Arbitrary text as a token is refused with a TokenError and nothing else."""
    with pytest.raises(TokenError):
        verify_token(SECRET, session_id, token, now=now)


# --- column tokens ----------------------------------------------------------------------------


def test_token_digest_is_sha256_hex():
    """The stored form is the SHA-256 hex digest, as PostgreSQL's sha256() would give it."""
    assert token_digest("abc") == hashlib.sha256(b"abc").hexdigest()


def test_digest_matches():
    """The token whose digest is stored matches; others, None and empty do not."""
    stored = token_digest("s3cret-token")
    assert digest_matches(stored, "s3cret-token")
    assert digest_matches(stored.upper(), "s3cret-token")
    assert not digest_matches(stored, "s3cret-tokeN")
    assert not digest_matches(None, "s3cret-token")
    assert not digest_matches(stored, None)
    assert not digest_matches(stored, "")
    assert not digest_matches("", "")
    assert not digest_matches("é" * 64, "s3cret-token")


def test_digest_of_overlong_token_is_not_computed():
    """A token over the length bound never matches, even against its own digest."""
    token = "x" * (MAX_TOKEN_LENGTH + 1)
    assert not digest_matches(token_digest(token), token)


def test_verify_digest_maps_to_close_codes():
    """Missing token: 4401; mismatch or no stored digest: 4403; a match returns."""
    stored = token_digest("t")
    verify_digest(stored, "t")
    with pytest.raises(TokenRequired):
        verify_digest(stored, None)
    with pytest.raises(TokenForbidden):
        verify_digest(stored, "u")
    with pytest.raises(TokenForbidden):
        verify_digest(None, "t")


@MODEST
@given(stored=st.one_of(st.none(), st.text(max_size=80)), token=st.one_of(st.none(), st.text()))
def test_digest_matches_never_raises(stored, token):
    """Whatever the column holds and the request carries, the answer is a bool."""
    assert isinstance(digest_matches(stored, token), bool)


# --- extracting and stripping the token -------------------------------------------------------


def test_token_from_query_parameter():
    """The ``token`` query parameter is the token."""
    assert extract_token({"token": ["abc"]}, {}, None) == "abc"


def test_query_parameter_wins_over_cookie():
    """With both, the query parameter is used."""
    assert extract_token({"token": ["q"]}, {"cookie": "tok=c"}, "tok") == "q"


def test_token_from_cookie():
    """Without a query parameter, the configured cookie carries the token."""
    assert extract_token({}, {"cookie": "a=1; tok=abc; b=2"}, "tok") == "abc"
    assert extract_token({}, {"Cookie": 'tok="abc"'}, "tok") == "abc"


def test_cookie_ignored_when_not_configured():
    """Without a cookie name, cookies are never read."""
    assert extract_token({}, {"cookie": "token=abc"}, None) is None


def test_no_token():
    """No parameter and no cookie: None, which the caller turns into 4401."""
    assert extract_token({"other": ["1"]}, {"cookie": "a=1"}, "tok") is None
    assert extract_token({}, {}, "tok") is None
    assert extract_token({"token": [""]}, {}, None) is None


def test_duplicate_token_parameters_are_forbidden():
    """Two token parameters are refused (4403), not guessed between."""
    with pytest.raises(TokenForbidden):
        extract_token({"token": ["a", "b"]}, {}, None)


def test_overlong_token_is_forbidden_when_extracted():
    """A token over 512 characters is refused as soon as it is found."""
    with pytest.raises(TokenForbidden):
        extract_token({"token": ["x" * (MAX_TOKEN_LENGTH + 1)]}, {}, None)
    with pytest.raises(TokenForbidden):
        extract_token({}, {"cookie": "tok=" + "x" * (MAX_TOKEN_LENGTH + 1)}, "tok")


def test_other_applications_odd_cookies_do_not_hide_the_token():
    """A JSON value or a cookie named like an attribute elsewhere in the header is skipped."""
    for header in [
        'prefs={"a": 1}; tok=abc',
        "path=/x; tok=abc",
        "expires=1; tok=abc",
        "junk; tok=abc",
        "tok=not valid; tok=abc",
    ]:
        assert extract_token({}, {"cookie": header}, "tok") == "abc", header


def test_malformed_cookie_header_means_no_token():
    """A Cookie header that cannot be parsed carries no token, and raises nothing."""
    for header in ['tok="unterminated', "tok", "=;;=", "tok=a b", "\x00\x01"]:
        assert extract_token({}, {"cookie": header}, "tok") is None, header


def test_first_of_duplicate_cookies_is_used():
    """Browsers send the most specific path's cookie first, so the first one is used."""
    assert extract_token({}, {"cookie": "tok=first; tok=second"}, "tok") == "first"


def test_strip_token_keeps_the_others_in_order():
    """Every ``token`` parameter goes, the others stay verbatim and in order."""
    assert strip_token("a=1&token=secret&b=%20x&token&c") == "a=1&b=%20x&c"
    assert strip_token("token=secret") == ""
    assert strip_token("") == ""
    assert strip_token("tok%65n=secret&x=1") == "x=1"
    assert strip_token("tokens=1&atoken=2") == "tokens=1&atoken=2"


@MODEST
@given(
    query=st.dictionaries(
        st.sampled_from(["token", "other"]) | st.text(max_size=10),
        st.lists(st.text(max_size=40), max_size=3),
        max_size=4,
    ),
    headers=st.dictionaries(
        st.sampled_from(["cookie", "Cookie", "origin"]) | st.text(max_size=10),
        st.text(max_size=200),
        max_size=3,
    ),
    cookie_name=st.none() | st.sampled_from(["tok", "token", "a"]),
)
def test_extract_token_never_raises_except_forbidden(query, headers, cookie_name):
    """Arbitrary requests yield None or a bounded token; only duplicates raise, and as 4403."""
    duplicates = len([v for v in query.get("token", []) if v]) > 1
    try:
        token = extract_token(query, headers, cookie_name)
    except TokenForbidden:
        return
    assert not duplicates
    assert token is None or 0 < len(token) <= MAX_TOKEN_LENGTH


@MODEST
@given(
    junk=st.lists(
        st.text(st.characters(blacklist_characters=";"), max_size=30).filter(
            lambda pair: pair.partition("=")[0].strip() != "tok"
        ),
        max_size=4,
    ),
    token=st.from_regex(r"[A-Za-z0-9._-]{1,100}", fullmatch=True),
    position=st.integers(min_value=0, max_value=4),
)
def test_token_cookie_is_found_among_any_others(junk, token, position):
    """However odd the other cookies, the token cookie is found."""
    pairs = list(junk)
    pairs.insert(min(position, len(pairs)), f"tok={token}")
    assert extract_token({}, {"cookie": "; ".join(pairs)}, "tok") == token


@MODEST
@given(st.text(max_size=200))
def test_strip_token_never_raises_and_removes_only_tokens(query_string):
    """On any query string the result parses to the same parameters minus ``token``."""
    stripped = strip_token(query_string)
    assert "token" not in parse_qs(stripped, keep_blank_values=True)
    expected = [p for p in parse_qsl(query_string, keep_blank_values=True) if p[0] != "token"]
    assert parse_qsl(stripped, keep_blank_values=True) == expected


def test_parse_cookie_name():
    """A cookie name is a token; empty means none; attribute names and junk are refused."""
    assert parse_cookie_name("novnc_token") == "novnc_token"
    assert parse_cookie_name("") is None
    for bad in ["Path", "expires", "a b", "a;b", "a=b", "é"]:
        with pytest.raises(ValueError):
            parse_cookie_name(bad)


# --- the secret file --------------------------------------------------------------------------


def write_secret(path: Path, data: bytes, mode: int = 0o600) -> str:
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def test_read_secret_strips_one_newline(tmp_path):
    """One trailing newline (LF or CRLF) is not part of the secret; a second one is."""
    assert read_secret(write_secret(tmp_path / "a", SECRET + b"\n")) == SECRET
    assert read_secret(write_secret(tmp_path / "b", SECRET + b"\r\n")) == SECRET
    assert read_secret(write_secret(tmp_path / "c", SECRET + b"\n\n")) == SECRET + b"\n"
    assert read_secret(write_secret(tmp_path / "d", SECRET)) == SECRET


def test_read_secret_allows_group_access(tmp_path):
    """Mode 0640 (readable by the daemon's group) is fine."""
    assert read_secret(write_secret(tmp_path / "s", SECRET, 0o640)) == SECRET


def test_read_secret_refuses_world_access(tmp_path):
    """A file other users may read or write is refused, naming the file and the fix."""
    for mode in (0o644, 0o602):
        path = write_secret(tmp_path / f"s{mode:o}", SECRET, mode)
        with pytest.raises(SecretFileError) as e:
            read_secret(path)
        assert path in str(e.value) and "chmod o-rw" in str(e.value)


def test_read_secret_refuses_short_or_empty(tmp_path):
    """Secrets under 16 bytes (after the newline is stripped) are refused, naming the file."""
    for data in (b"", b"\n", b"x" * 15 + b"\n"):
        path = write_secret(tmp_path / "s", data)
        with pytest.raises(SecretFileError) as e:
            read_secret(path)
        assert path in str(e.value) and "at least 16 bytes" in str(e.value)


def test_read_secret_refuses_missing_directory_and_huge(tmp_path):
    """A missing file, a directory and a file too large to be a secret are refused clearly."""
    for path in (str(tmp_path / "missing"), str(tmp_path)):
        with pytest.raises(SecretFileError) as e:
            read_secret(path)
        assert path in str(e.value)
    with pytest.raises(SecretFileError, match="larger than"):
        read_secret(write_secret(tmp_path / "big", b"x" * 5000))


# --- mint-token -------------------------------------------------------------------------------


def test_mint_token_command_prints_a_valid_token(tmp_path, capsys):
    """``mint-token`` prints a token that verifies for the session and expires after --ttl."""
    path = write_secret(tmp_path / "secret", SECRET + b"\n")
    before = int(time.time())
    assert mint_token_command(["--secret-file", path, "--session", SESSION, "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    verify_token(SECRET, SESSION, token, now=before)
    assert before + 60 <= int(token.partition(".")[0]) <= int(time.time()) + 60


def test_python_m_twisted_novnc_mint_token(tmp_path, capsys):
    """The command is reachable as ``python -m twisted_novnc mint-token``."""
    path = write_secret(tmp_path / "secret", SECRET)
    assert main(["mint-token", "--secret-file", path, "--session", "abc"]) == 0
    token = capsys.readouterr().out.strip()
    verify_token(SECRET, "abc", token, now=time.time())


def test_mint_token_command_errors(tmp_path, capsys):
    """A bad secret file, session id or ttl exits 2 with one line on stderr."""
    good = write_secret(tmp_path / "secret", SECRET)
    loose = write_secret(tmp_path / "loose", SECRET, 0o644)
    for argv in [
        ["--secret-file", loose, "--session", "abc"],
        ["--secret-file", str(tmp_path / "missing"), "--session", "abc"],
        ["--secret-file", good, "--session", "a/b"],
        ["--secret-file", good, "--session", "abc", "--ttl", "0"],
    ]:
        assert mint_token_command(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("twisted_novnc: mint-token:")
        assert captured.err.count("\n") == 1



def test_mint_token_ttl_beyond_the_configs_max_token_age_is_refused(tmp_path, capsys):
    """``mint-token --config``: a --ttl beyond that config's [auth] max_token_age exits 2 (the
    daemon would refuse the token); within it, the token is printed."""
    path = write_secret(tmp_path / "secret", SECRET)
    config = tmp_path / "novnc.ini"
    config.write_text("[auth]\nmax_token_age = 600\n")
    base = ["mint-token", "--secret-file", path, "--session", "abc", "--config", str(config)]
    assert main([*base, "--ttl", "601"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "max_token_age" in captured.err
    assert main([*base, "--ttl", "600"]) == 0
    assert capsys.readouterr().out.strip()


def test_mint_token_ttl_beyond_the_default_max_token_age_warns(tmp_path, capsys):
    """Without a config, a --ttl beyond the default max_token_age still prints the token, with
    a one-line warning on stderr; one within it prints no warning."""
    path = write_secret(tmp_path / "secret", SECRET)
    base = ["--secret-file", path, "--session", "abc", "--ttl"]
    assert mint_token_command([*base, str(DEFAULT_MAX_TOKEN_AGE + 1)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and captured.err.count("\n") == 1
    assert "warning" in captured.err and "max_token_age" in captured.err
    assert mint_token_command([*base, str(DEFAULT_MAX_TOKEN_AGE)]) == 0
    assert capsys.readouterr().err == ""
