"""Shared building blocks of the micro-services."""
