"""The per-GPU worker: pulls requests from Redis Streams and runs them on an engine."""
