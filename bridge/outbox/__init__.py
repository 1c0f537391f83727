"""The transactional outbox: domain events the backend wrote into PostgreSQL in its own
transactions, relayed to their students at once and to Kafka when it answers
(docs/outbox.md)."""
