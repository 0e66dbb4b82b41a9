"""The sessions' database: the PostgreSQL store, the readiness gate, the schema, the embedded
cluster."""
