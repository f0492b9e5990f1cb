"""In-process tests: a worker (sim engine) driven in the test's event loop against a real redis-server."""
