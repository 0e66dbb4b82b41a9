"""What the request path needs of a session database, as interfaces.

The readiness gate reads rows through an :class:`ISessionSource`; the pipeline spends one-time
tokens through an :class:`ITokenStore`.  :class:`~twisted_novnc.database.store.PostgresSessionStore`
provides both, and so does the in-memory fake in :mod:`twisted_novnc.testing`; one contract
suite (``tests/contract/``) runs against each, so the fake cannot drift from the real store.

Ids come in two kinds: a *raw* id is whatever a request named; a *canonical* id is how the
database prints the id column (``normalise_id``'s answer, and every ``SessionRow.session_id``).
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import Deferred
from zope.interface import Interface

from twisted_novnc.session import SessionRow


class ISessionSource(Interface):
    """Committed session rows, read in batches."""

    def normalise_id(raw: str) -> str | None:
        """The canonical form of a raw id, or None when no row can have it.

        Every spelling of one id the column accepts maps to the same canonical id (for a
        ``uuid`` column: upper case, braces, no dashes; for an integer column: leading zeros),
        and a canonical id maps to itself.  None is the answer for ids the column cannot hold
        (not a UUID, not an integer in range, a NUL); it never raises.
        """

    def fetch(session_ids: Iterable[str]) -> Deferred[dict[str, SessionRow]]:
        """The committed rows of these sessions, keyed by canonical id.

        ``session_ids`` are raw: each is normalised, so any accepted spelling finds its row, and
        one that no row can have is absent like a missing row (it never fails the batch).  An
        empty request answers an empty dict.  The Deferred fails only when the database cannot
        be read.
        """

    def follow(key: str) -> None:
        """This canonical id gained interest (its first waiter or watched relay): its changes
        must be announced from now on.

        A store that LISTENs per shard (``[database] notify_shards``) LISTENs on the key's
        shard and, once that is active, tells its observer ``listening([key, ...])`` so the row
        is read again; a store with one channel for all has nothing to do.
        """

    def unfollow(key: str) -> None:
        """This canonical id lost its last waiter and watch (its shard may be UNLISTENed)."""


class ITokenStore(Interface):
    """One-time tokens kept (as digests) in the session row."""

    def consume_token(session_id: str, digest: str) -> Deferred[SessionRow | None]:
        """Spend the token of the row with this canonical id if its digest equals ``digest``.

        Fires with the row as it is once spent (its ``token_digest`` now None); None when
        nothing matched (a wrong digest, already spent, never set, or no such row).  Exactly
        one of two racing calls with the same digest gets the row.
        """
