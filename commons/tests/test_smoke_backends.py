"""The parametrized backend fixture reaches both backends."""

from commons.cache import CacheSettings, cache_status


async def test_backend_fixture_initialises_the_requested_backend(
    backend: CacheSettings, backend_name: str
) -> None:
    assert cache_status().backend == backend_name
