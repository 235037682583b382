"""Store: a replicated key-value store built on CRDTs, persisted in SQLite."""
