"""The WebSocket gateway: students' devices, the HTTP API, the console (docs/architecture.md)."""
