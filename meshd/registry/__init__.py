"""Registry: service instances replicated to every node as CRDT state."""
