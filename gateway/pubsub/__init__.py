"""The process's Redis Pub/Sub: one connection per primary, channels routed by slot."""
