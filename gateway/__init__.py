"""The stateless HTTP gateway: validates, enqueues on Redis Streams, awaits the per-request result."""
