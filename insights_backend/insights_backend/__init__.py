"""insights_backend: an example service."""
