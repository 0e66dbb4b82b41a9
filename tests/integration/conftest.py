"""Integration fixtures: a fresh sessions table per test on the real cluster."""

from db_fixtures import pg_factory, sessions_table  # noqa: F401  (fixtures)
