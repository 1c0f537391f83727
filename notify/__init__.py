"""notify-gateway: Kafka domain events and direct publishes pushed to students' WebSockets."""
