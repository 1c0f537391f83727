"""The bridge: Kafka domain events to per-student notifications (docs/events.md)."""
