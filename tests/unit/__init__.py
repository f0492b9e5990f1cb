"""Pure tests of single modules: no processes, no Redis."""
