"""The broker: pub/sub across the mesh (topics, queue groups, durable topics)."""
