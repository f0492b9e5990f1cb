"""Shared by the gateway, the GPU workers and batch producers: settings, schemas, Redis keys, errors."""
