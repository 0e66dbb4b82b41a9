"""Moving bytes: the relay between two peers, the upstream connectors, the target policy."""
