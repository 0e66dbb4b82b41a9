"""What the request path needs of a session database, as interfaces.

The readiness gate reads rows through an :class:`ISessionSource`; the pipeline spends one-time
tokens through an :class:`ITokenStore`.  :class:`~twisted_novnc.database.store.PostgresSessionStore`
provides both, and so does the in-memory fake in :mod:`twisted_novnc.testing`; one contract
suite (``tests/contract/``) runs against each, so the fake cannot drift from the real store.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import Deferred
from zope.interface import Interface

from twisted_novnc.session import SessionRow


class ISessionSource(Interface):
    """Committed session rows, read in batches."""

    def normalise_id(raw: str) -> str | None:
        """The id as the database prints it (its canonical form), or None when no row can
        have it (e.g. not a UUID for a ``uuid`` column)."""

    def fetch(session_ids: Iterable[str]) -> Deferred[dict[str, SessionRow]]:
        """The committed rows of these sessions, keyed by canonical id; absent ids are absent."""


class ITokenStore(Interface):
    """One-time tokens kept (as digests) in the session row."""

    def consume_token(session_id: str, digest: str) -> Deferred[SessionRow | None]:
        """Clear the row's token if it still equals ``digest`` and return the row as it was;
        None when it did not match (already spent, never set, or no such row).  Exactly one
        of two racing calls with the same digest gets the row."""
