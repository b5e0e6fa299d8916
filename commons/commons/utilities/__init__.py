"""Small utilities shared by the services."""
