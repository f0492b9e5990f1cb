"""Operations: the ``mgpu`` command line, the local supervisor, benchmarks and deployment files."""
