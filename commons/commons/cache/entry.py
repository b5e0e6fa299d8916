"""How a response is stored: JSON bytes, never pickle.

The common case, a ``200 application/json`` response, is stored as its body alone: the exact bytes
the client receives, so a hit sends them without decoding anything (and they are what
fastapi-cache2's ``JsonCoder`` would store for the same value). Any other response is stored as a
small JSON envelope holding status, media type, headers and body. A body that happens to start like
an envelope is always wrapped, so the two forms never get confused.

Nothing else is stored with an entry. Its freshness for ``stale_ttl`` comes from the time it has
left to live in the store (see ``decorator.py``), and its ETag is a digest of the body computed once
per stored value in each process (see ``http.py``), so the common case stays the plain body, the
same bytes fastapi-cache2's decorator stores and reads.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

__all__ = ["CachedResponse", "decode_entry", "encode_entry"]

_JSON = "application/json"
_ENVELOPE_MARK = b'{"__commons_cache__":1,'


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A response as it is stored and replayed."""

    body: bytes
    status_code: int = 200
    media_type: str = _JSON
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def is_plain_json(self) -> bool:
        return (
            self.status_code == 200
            and self.media_type == _JSON
            and not self.headers
            and not self.body.startswith(_ENVELOPE_MARK)
        )


def encode_entry(response: CachedResponse) -> bytes:
    """The bytes to store for ``response``."""
    if response.is_plain_json:
        return response.body
    envelope: dict[str, object] = {
        "status": response.status_code,
        "media_type": response.media_type,
        "headers": [list(pair) for pair in response.headers],
    }
    try:
        envelope["body"] = response.body.decode("utf-8")
    except UnicodeDecodeError:
        envelope["body_base64"] = base64.b64encode(response.body).decode("ascii")
    encoded = json.dumps(envelope, ensure_ascii=False, separators=(",", ":"))
    return _ENVELOPE_MARK + encoded[1:].encode("utf-8")


def decode_entry(raw: bytes) -> CachedResponse:
    """The response stored as ``raw``; raises ``ValueError`` if ``raw`` is no valid entry."""
    if not raw.startswith(_ENVELOPE_MARK):
        return CachedResponse(raw)
    envelope = json.loads(raw)
    if "body" in envelope:
        body = envelope["body"].encode("utf-8")
    else:
        body = base64.b64decode(envelope["body_base64"])
    return CachedResponse(
        body=body,
        status_code=int(envelope["status"]),
        media_type=str(envelope["media_type"]),
        headers=tuple((str(name), str(value)) for name, value in envelope["headers"]),
    )
