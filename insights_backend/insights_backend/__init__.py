"""insights_backend: an example service that caches its responses with ``commons.cache``.

It serves a tenant's configuration, the current user's profile, a paginated list of insights and an
admin-only list of tenants, from SQLite through SQLAlchemy's async engine. Identity comes from a
verified bearer JWT only. Start it with ``python -m insights_backend``; mint a development token
with ``python -m insights_backend.dev_token --tenant 1 --user alice``.
"""
