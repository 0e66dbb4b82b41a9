"""The session interfaces' contract, run against every implementation (see ``conftest.py``).

What the readiness gate and the pipeline rely on: ids normalised to the database's canonical
form (so the fake and PostgreSQL agree on which ids name the same row), batched reads keyed by
that form, and one-time tokens spent exactly once.
"""

from __future__ import annotations

import hashlib

import pytest
import pytest_twisted
from session_store_harness import ID_TYPES, Harness
from twisted.internet import defer
from zope.interface.verify import verifyObject

from twisted_novnc.database.interfaces import ISessionSource, ITokenStore
from twisted_novnc.session import SessionRow, VNCCredentials

UUID = "3f1c6a52-8a4e-4a55-9f53-0f6a0f3c2a10"
OTHER_UUID = "0b9c1d2e-3f40-4a51-8b62-7c83d94ea5f6"

#: Three canonical ids per column type, as PostgreSQL prints them.
CANONICAL = {
    "uuid": (UUID, OTHER_UUID, "00000000-0000-0000-0000-000000000000"),
    "integer": ("7", "-2147483648", "2147483647"),
    "bigint": ("9223372036854775807", "42", "-9223372036854775808"),
    "text": ("Session-7", " padded é ", "session-7"),
}

#: (raw, canonical) spellings each column type accepts.
SPELLINGS = {
    "uuid": [
        (UUID.upper(), UUID),
        ("{" + UUID + "}", UUID),
        (UUID.replace("-", ""), UUID),
        ("{" + UUID.replace("-", "").upper() + "}", UUID),
    ],
    "integer": [("007", "7"), ("-0", "0"), ("2147483647", "2147483647"), ("-00042", "-42")],
    "bigint": [("0009223372036854775807", "9223372036854775807"), ("042", "42")],
    "text": [("Session-7", "Session-7"), ("007", "007"), (UUID.upper(), UUID.upper())],
}

#: Ids normalise_id refuses: what the column cannot hold, and spellings a URL should not use
#: for an integer (hex, a plus sign or spaces, which some PostgreSQL versions read).
REJECTED = {
    "uuid": ["not-a-uuid", "", UUID[:-1], UUID + "0", "' OR 1=1 --", "7"],
    "integer": [
        "", "-", "--5", "abc", "1.5", " 7", "+7", "+-7", "0x10", "1_000",
        "2147483648", "-2147483649", "\u0663", "\u00b2", UUID,
    ],
    "bigint": ["9223372036854775808", "-9223372036854775809", "--5", "\u00b2", ""],
    "text": ["a\x00b"],
}


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def full_row(session_id: str, token: str | None = "secret") -> SessionRow:
    """A row with every column the proxy reads filled in."""
    return SessionRow(
        session_id,
        vm_ip="10.0.0.5",
        port=5901,
        status="running",
        expires_at=1767225600.25,
        token_digest=digest(token) if token is not None else None,
        credentials=VNCCredentials("vnc-pass", "vnc-user"),
        record=True,
    )


every_id_type = pytest.mark.parametrize("id_type", ID_TYPES)


# -- both interfaces ---------------------------------------------------------------------


def test_provides_both_interfaces(harness: Harness) -> None:
    """The implementation declares and fully provides ISessionSource and ITokenStore."""
    assert verifyObject(ISessionSource, harness.source)
    assert verifyObject(ITokenStore, harness.source)


# -- normalise_id -----------------------------------------------------------------------


@every_id_type
def test_canonical_ids_stay_as_they_are(harness: Harness) -> None:
    """A canonical id (as the database prints it) normalises to itself."""
    for canonical in CANONICAL[harness.id_type]:
        assert harness.source.normalise_id(canonical) == canonical


@every_id_type
def test_spellings_normalise_to_the_canonical_id(harness: Harness) -> None:
    """Every spelling the column accepts normalises to the one form the database prints."""
    got = {raw: harness.source.normalise_id(raw) for raw, _ in SPELLINGS[harness.id_type]}
    assert got == dict(SPELLINGS[harness.id_type])


@every_id_type
def test_rejected_ids_normalise_to_none(harness: Harness) -> None:
    """An id the column cannot hold (or an exotic spelling) normalises to None, not an error."""
    got = {raw: harness.source.normalise_id(raw) for raw in REJECTED[harness.id_type]}
    assert got == dict.fromkeys(REJECTED[harness.id_type])


# -- fetch ------------------------------------------------------------------------------


@every_id_type
@pytest_twisted.ensureDeferred
async def test_fetch_reads_committed_rows_by_canonical_id(harness: Harness) -> None:
    """fetch answers the committed rows keyed by canonical id; absent ids are absent."""
    a, b, missing = CANONICAL[harness.id_type]
    harness.put(full_row(a))
    harness.put(SessionRow(b, None))
    rows = await harness.source.fetch([a, b, missing])
    assert rows == {a: full_row(a), b: SessionRow(b, None)}


@every_id_type
@pytest_twisted.ensureDeferred
async def test_fetch_finds_a_row_by_any_spelling(harness: Harness) -> None:
    """A row is found whichever accepted spelling of its id is asked for."""
    spellings = SPELLINGS[harness.id_type]
    for canonical in {canonical for _, canonical in spellings}:
        harness.put(SessionRow(canonical, "10.0.0.5"))
    for raw, canonical in spellings:
        assert list(await harness.source.fetch([raw])) == [canonical], raw


@every_id_type
@pytest_twisted.ensureDeferred
async def test_fetch_skips_rejected_ids(harness: Harness) -> None:
    """Ids the column cannot hold are absent, and do not spoil the rest of the batch."""
    a = CANONICAL[harness.id_type][0]
    harness.put(full_row(a))
    rows = await harness.source.fetch([*REJECTED[harness.id_type], a])
    assert rows == {a: full_row(a)}


@pytest_twisted.ensureDeferred
async def test_fetch_of_nothing_is_empty(harness: Harness) -> None:
    """An empty request answers an empty dict."""
    harness.put(full_row(UUID))
    assert await harness.source.fetch([]) == {}


@pytest_twisted.ensureDeferred
async def test_fetch_of_one_row_in_two_spellings_answers_it_once(harness: Harness) -> None:
    """Two spellings of one id in a batch answer one row, under its canonical id."""
    harness.put(full_row(UUID))
    rows = await harness.source.fetch([UUID, UUID.upper(), OTHER_UUID])
    assert rows == {UUID: full_row(UUID)}


@pytest_twisted.ensureDeferred
async def test_fetch_returns_every_column_as_committed(harness: Harness) -> None:
    """vm_ip, port, status, expires_at, the token digest, the VNC credentials and the record
    flag read back as committed, or None."""
    harness.put(full_row(UUID))
    harness.put(SessionRow(OTHER_UUID, None, None, None, None, None))
    rows = await harness.source.fetch([UUID, OTHER_UUID])
    assert rows[UUID] == SessionRow(
        UUID, "10.0.0.5", 5901, "running", 1767225600.25, digest("secret"),
        VNCCredentials("vnc-pass", "vnc-user"), record=True,
    )
    assert rows[UUID].credentials.password == "vnc-pass"
    assert "vnc-pass" not in repr(rows[UUID])
    assert rows[OTHER_UUID] == SessionRow(OTHER_UUID, None, None, None, None, None)


# -- consume_token -----------------------------------------------------------------------


@every_id_type
@pytest_twisted.ensureDeferred
async def test_a_matching_token_is_spent_once(harness: Harness) -> None:
    """The matching digest answers the row with its token spent; a second call gets None."""
    a = CANONICAL[harness.id_type][0]
    harness.put(full_row(a))
    first = await harness.source.consume_token(a, digest("secret"))
    assert first == full_row(a, token=None)
    assert await harness.source.consume_token(a, digest("secret")) is None


@pytest_twisted.ensureDeferred
async def test_a_spent_token_is_gone_from_the_row(harness: Harness) -> None:
    """After spending, the row reads back without its token and otherwise unchanged."""
    harness.put(full_row(UUID))
    await harness.source.consume_token(UUID, digest("secret"))
    assert await harness.source.fetch([UUID]) == {UUID: full_row(UUID, token=None)}


@pytest_twisted.ensureDeferred
async def test_a_wrong_token_spends_nothing(harness: Harness) -> None:
    """A digest that does not match answers None and leaves the token in place."""
    harness.put(full_row(UUID))
    assert await harness.source.consume_token(UUID, digest("guess")) is None
    assert await harness.source.fetch([UUID]) == {UUID: full_row(UUID)}
    assert await harness.source.consume_token(UUID, digest("secret")) is not None


@pytest_twisted.ensureDeferred
async def test_no_row_or_no_token_answers_none(harness: Harness) -> None:
    """A missing row, or a row that never had a token, answers None."""
    harness.put(full_row(OTHER_UUID, token=None))
    assert await harness.source.consume_token(UUID, digest("secret")) is None
    assert await harness.source.consume_token(OTHER_UUID, digest("secret")) is None


@pytest_twisted.ensureDeferred
async def test_racing_calls_spend_a_token_once(harness: Harness) -> None:
    """Of several calls racing with the same digest, exactly one gets the row."""
    harness.put(full_row(UUID))
    results = await defer.gatherResults(
        [harness.source.consume_token(UUID, digest("secret")) for _ in range(4)]
    )
    assert results.count(None) == 3
