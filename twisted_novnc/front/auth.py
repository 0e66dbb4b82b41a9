"""Who may open a session: the pure decisions of ``[auth]``, apart from any I/O or SQL.

Two ways to prove a browser may open a session, both carried by a token in the query parameter
``token`` or in a configured cookie:

``column``
    The backend stores the SHA-256 hex digest of a random token in the session row
    (:func:`token_digest`); the proxy compares it in constant time (:func:`digest_matches`).
    Only the digest is stored, so a leaked table does not leak usable tokens.

``hmac``
    A stateless token, ``<expires_at>.<mac>``, that any backend holding the secret can mint
    without touching the database::

        message = "tnovnc1:" + str(len(session_id_utf8)) + ":" + session_id + ":" + str(expires_at)
        mac     = HMAC-SHA256(secret, message as UTF-8)
        token   = str(expires_at) + "." + base64url(mac) without "=" padding

    ``expires_at`` is whole seconds since the epoch, written in decimal without leading zeros;
    the token is valid while ``now < expires_at``, and refused (4403) when ``expires_at`` lies
    more than ``[auth] max_token_age`` seconds ahead of ``now``: a leaked token is not a key
    for ever.  ``secret`` is the exact bytes of
    ``secret_file`` minus one trailing newline (see :func:`read_secret`): a secret made with
    ``head -c 32 /dev/urandom | base64 > secret`` is used as that base64 *text*, not decoded.
    The length prefix keeps ids apart (``ab`` with ``12`` is not ``a`` with ``b12``).  In
    Python, :func:`mint_token`; from a shell,
    ``python -m twisted_novnc mint-token --secret-file F --session ID [--ttl SECONDS]``.

Every refusal is a :class:`TokenError`, a :class:`~twisted_novnc.errors.Refused` whose
refusal is the close code the browser gets, so the front end needs no mapping of its own.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import re
import sys
import time
from collections.abc import Mapping, Sequence
from http.cookies import CookieError, Morsel, SimpleCookie
from typing import ClassVar
from urllib.parse import unquote_plus

from twisted_novnc.errors import Refusal, Refused
from twisted_novnc.front.paths import SESSION_ID_PATTERN
from twisted_novnc.privatefile import PrivateFileError, read_private_file

#: The query parameter that carries a token.
TOKEN_PARAMETER = "token"
#: Longer tokens are refused before any parsing or hashing: no valid token comes near it.
MAX_TOKEN_LENGTH = 512
#: A shorter HMAC secret is guessable; 16 bytes is the floor, 32 random bytes the advice.
MIN_SECRET_BYTES = 16
#: A secret file larger than this is almost certainly the wrong file.
MAX_SECRET_BYTES = 4096
#: Expiry times have at most 18 digits so every language's 64-bit integers hold them.
MAX_EXPIRES_AT = 10**18 - 1
#: Seconds a token from ``mint-token`` lives unless ``--ttl`` says otherwise.
DEFAULT_TTL = 300
#: ``[auth] max_token_age``'s default: a token expiring further ahead than this is refused.
DEFAULT_MAX_TOKEN_AGE = 86400

_MAC_LENGTH = 43  # base64url of 32 bytes, unpadded
_HMAC_TOKEN = re.compile(rf"(0|[1-9][0-9]{{0,17}})\.([A-Za-z0-9_-]{{{_MAC_LENGTH}}})")


class TokenError(Refused):
    """A token that does not let the browser in; the subclass fixes the close code."""

    _refusal: ClassVar[Refusal] = Refusal.FORBIDDEN

    def __init__(self, detail: str = "") -> None:
        super().__init__(self._refusal, detail)


class TokenRequired(TokenError):
    """No token was given (4401): the browser may retry with one."""

    _refusal = Refusal.TOKEN_REQUIRED


class TokenExpired(TokenError):
    """A genuine token whose time has passed (4401): the backend should mint a fresh one."""

    _refusal = Refusal.TOKEN_EXPIRED


class TokenForbidden(TokenError):
    """A malformed, forged or other session's token (4403); retrying the same cannot help."""

    _refusal = Refusal.FORBIDDEN


#: The HMAC secret file cannot be used; the message names the file and what to do.
SecretFileError = PrivateFileError


# --- hmac tokens ------------------------------------------------------------------------------


def _check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the HMAC secret must be at least {MIN_SECRET_BYTES} bytes long")


def _mac(secret: bytes, session_id: str, expires_at: int) -> str:
    """The token's MAC part, over an encoding in which no two (id, expiry) pairs collide."""
    sid = session_id.encode("utf-8")
    message = b"tnovnc1:%d:%s:%d" % (len(sid), sid, expires_at)
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def mint_token(secret: bytes, session_id: str, expires_at: int) -> str:
    """A token that opens ``session_id`` until ``expires_at`` (seconds since the epoch)."""
    _check_secret(secret)
    if isinstance(expires_at, bool) or not isinstance(expires_at, int):
        raise TypeError(f"expires_at must be whole seconds (an int), got {expires_at!r}")
    if not 0 <= expires_at <= MAX_EXPIRES_AT:
        raise ValueError(f"expires_at must be from 0 to {MAX_EXPIRES_AT}, got {expires_at}")
    return f"{expires_at}.{_mac(secret, session_id, expires_at)}"


def verify_token(
    secret: bytes,
    session_id: str,
    token: str | None,
    now: float,
    max_age: float | None = None,
) -> None:
    """Return if ``token`` opens ``session_id`` at ``now``; raise a :class:`TokenError` if not.

    The MAC is checked before the expiry, so a forged token is 4403 whatever time it names.
    A genuine token that expires more than ``max_age`` seconds after ``now`` is 4403 too: it
    was minted against the policy, and minting the same again cannot help.
    """
    _check_secret(secret)
    if not token:
        raise TokenRequired()
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenForbidden(f"token longer than {MAX_TOKEN_LENGTH} characters")
    match = _HMAC_TOKEN.fullmatch(token)
    if match is None:
        raise TokenForbidden("malformed token")
    expires_at = int(match[1])
    try:
        expected = _mac(secret, session_id, expires_at)
    except UnicodeEncodeError:
        raise TokenForbidden("session id is not valid text") from None
    # Comparing the encoded MACs, not decoded bytes, also refuses non-canonical base64.
    if not hmac.compare_digest(match[2].encode("ascii"), expected.encode("ascii")):
        raise TokenForbidden("token does not match the session")
    if now >= expires_at:
        raise TokenExpired(f"token expired at {expires_at}")
    if max_age is not None and expires_at > now + max_age:
        raise TokenForbidden(
            f"token expires at {expires_at}, more than max_token_age ({max_age:g}s) ahead"
        )


# --- column tokens ----------------------------------------------------------------------------


def token_digest(token: str) -> str:
    """The SHA-256 hex digest of ``token``: what the session row stores instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def digest_matches(stored_hex: str | None, token: str | None) -> bool:
    """Whether ``token`` hashes to the row's ``stored_hex``, compared in constant time."""
    if stored_hex is None or not token or len(token) > MAX_TOKEN_LENGTH:
        return False
    try:
        computed = token_digest(token).encode("ascii")
    except UnicodeEncodeError:
        return False
    # Bytes, not str: compare_digest refuses non-ASCII str, and a column may hold anything.
    stored = stored_hex.strip().lower().encode("utf-8", "replace")
    return hmac.compare_digest(stored, computed)


def verify_digest(stored_hex: str | None, token: str | None) -> None:
    """Return if ``token`` matches the row's digest; raise a :class:`TokenError` if not."""
    if not token:
        raise TokenRequired()
    if not digest_matches(stored_hex, token):
        raise TokenForbidden("token does not match the session's digest")


# --- the request ------------------------------------------------------------------------------


def extract_token(
    query: Mapping[str, Sequence[str]], headers: Mapping[str, str], cookie_name: str | None
) -> str | None:
    """The request's token: the ``token`` query parameter, else the named cookie, else None.

    ``query`` is ``parse_qs`` output and ``headers`` a name -> value mapping (Autobahn's
    ``request.params`` and ``request.headers``).  Two ``token`` parameters are refused (4403)
    rather than guessed between; a malformed ``Cookie`` header just carries no token.
    """
    values = [v for v in query.get(TOKEN_PARAMETER, ()) if v]
    if len(values) > 1:
        raise TokenForbidden("more than one token parameter")
    token: str | None = None
    if values:
        token = values[0]
    elif cookie_name:
        token = _cookie(headers, cookie_name)
    if token is not None and len(token) > MAX_TOKEN_LENGTH:
        raise TokenForbidden(f"token longer than {MAX_TOKEN_LENGTH} characters")
    return token


def _cookie(headers: Mapping[str, str], name: str) -> str | None:
    """The first well-formed cookie ``name``, or None.

    Each ``name=value`` pair is parsed on its own: ``SimpleCookie`` drops a whole header at
    its first oddity (a JSON value, a cookie called ``path``), and other applications on the
    same site set such cookies.  Browsers send the cookie of the most specific path first.
    """
    header = next((v for k, v in headers.items() if k.lower() == "cookie"), None)
    if not header:
        return None
    for pair in header.split(";"):
        if pair.partition("=")[0].strip() != name:
            continue
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(pair)
        except (CookieError, ValueError, TypeError):
            continue
        morsel = jar.get(name)
        if morsel is not None:
            return morsel.value or None
    return None


_COOKIE_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def parse_cookie_name(text: str) -> str | None:
    """An ``[auth] cookie`` value: a cookie name, or None when empty (no cookie is read).

    Names ``SimpleCookie`` takes for attributes (``path``, ``expires``, ...) could never be
    read back, so they are refused here rather than silently never matching.
    """
    if not text:
        return None
    if not _COOKIE_NAME.fullmatch(text):
        raise ValueError(
            f"must be a cookie name (letters, digits and !#$%&'*+.^_`|~-), got {text!r}"
        )
    if Morsel().isReservedKey(text):
        raise ValueError(f"{text!r} is a cookie attribute's name; choose another cookie name")
    return text


def strip_token(query_string: str) -> str:
    """``query_string`` (without ``?``) minus every ``token`` parameter, the rest untouched.

    Names are compared decoded, as ``parse_qs`` decodes them, so ``tok%65n=`` goes too.
    """
    kept = [
        part
        for part in query_string.split("&")
        if unquote_plus(part.partition("=")[0]) != TOKEN_PARAMETER
    ]
    return "&".join(kept)


# --- the secret file --------------------------------------------------------------------------


def read_secret(path: str) -> bytes:
    """The HMAC secret in ``path``: its bytes minus one trailing newline.

    Refuses (with :class:`SecretFileError`) what :func:`read_private_file` refuses (a missing,
    unreadable or non-regular file, one that other users may read or write: anyone who reads
    it can mint tokens for every session) and a secret shorter than 16 bytes.
    """
    data = read_private_file(path, "the HMAC secret file", MAX_SECRET_BYTES)
    if len(data) < MIN_SECRET_BYTES:
        raise SecretFileError(
            f"{path}: the HMAC secret must be at least {MIN_SECRET_BYTES} bytes, got {len(data)};"
            " make one with: head -c 32 /dev/urandom | base64"
        )
    return data


# --- mint-token -------------------------------------------------------------------------------


def add_mint_token_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mint-token``, shared by this module's parser and ``__main__``'s."""
    parser.add_argument(
        "--secret-file", required=True, help="the file named by [auth] secret_file"
    )
    parser.add_argument("--session", required=True, help="the session id the token opens")
    parser.add_argument(
        "--ttl",
        type=int,
        default=DEFAULT_TTL,
        help=f"seconds until the token expires (default {DEFAULT_TTL})",
    )


def run_mint_token(
    args: argparse.Namespace, now: float | None = None, max_token_age: float | None = None
) -> int:
    """Print a token for ``args.session``; 2 and a one-line error when it cannot.

    A ``--ttl`` beyond ``max_token_age`` (the config's, when known) is refused: the daemon
    would refuse the token.  Without a config, one beyond the default is minted with a warning.
    """
    if not re.fullmatch(SESSION_ID_PATTERN, args.session):
        print(
            f"twisted_novnc: mint-token: {args.session!r} cannot appear in a session path"
            " (1 to 128 of A-Z a-z 0-9 . _ ~ -)",
            file=sys.stderr,
        )
        return 2
    if args.ttl <= 0:
        print("twisted_novnc: mint-token: --ttl must be greater than 0", file=sys.stderr)
        return 2
    if max_token_age is not None and args.ttl > max_token_age:
        print(
            f"twisted_novnc: mint-token: --ttl {args.ttl} is beyond [auth] max_token_age"
            f" ({max_token_age:g}); the daemon would refuse the token",
            file=sys.stderr,
        )
        return 2
    if max_token_age is None and args.ttl > DEFAULT_MAX_TOKEN_AGE:
        print(
            f"twisted_novnc: mint-token: warning: --ttl {args.ttl} is beyond the default"
            f" [auth] max_token_age ({DEFAULT_MAX_TOKEN_AGE}); a daemon with that default"
            " refuses the token",
            file=sys.stderr,
        )
    try:
        secret = read_secret(args.secret_file)
    except SecretFileError as e:
        print(f"twisted_novnc: mint-token: {e}", file=sys.stderr)
        return 2
    expires_at = int(time.time() if now is None else now) + args.ttl
    try:
        token = mint_token(secret, args.session, expires_at)
    except ValueError as e:
        print(f"twisted_novnc: mint-token: {e}", file=sys.stderr)
        return 2
    print(token)
    return 0


def mint_token_command(argv: Sequence[str] | None = None) -> int:
    """``mint-token``: print an hmac-mode token, for shell scripts and trying things out."""
    parser = argparse.ArgumentParser(
        prog="python -m twisted_novnc mint-token",
        description="Print a token that opens one session in [auth] mode = hmac.",
    )
    add_mint_token_arguments(parser)
    return run_mint_token(parser.parse_args(argv))
