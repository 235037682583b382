"""Store engines: databases served by PostgreSQL or Redis instead of the embedded store."""
