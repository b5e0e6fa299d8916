"""How a value is stored: a JSON array with a format marker, never pickle, never trusted blindly.

Every stored value, in Redis and in memory, for both decorators, is one JSON array::

    ["commons.cache",3,"<fingerprint>","<generation>","<kind>",<stale seconds>,<lifetime>,<payload>]

- ``"commons.cache",3`` is the format marker. Bytes without it (garbage, another library's value,
  an older deploy's format) are never served: the read is a miss, counted as a rejected entry, and
  the fill overwrites them. The previous shape (marker ``2``, no ``lifetime``), which deploys
  before ``Age`` wrote, is still read until its entries expire: served, without ``Age``.
- ``fingerprint`` names what the route renders (:func:`route_fingerprint`): another fingerprint
  is a miss, so during a rolling deploy old and new replicas each see the other's entries as
  misses, never as errors or as the wrong shape.
- ``generation`` is the scope's generation when the fill began (see ``backends/redis/store.py``): an
  entry is valid only while it equals the scope's generation now, which is how an invalidation by
  any replica, or the loss of any helper key, can only ever cost a miss.
- ``kind`` is ``b`` when ``payload`` is the response body itself (a ``200 application/json``
  answer: a hit sends those bytes without decoding anything) or ``e`` for an envelope object with
  status, media type, headers and body (any other answer).
- ``stale seconds`` is the stale window at the end of the entry's life (stale-while-revalidate,
  stale-if-error): the entry is fresh while more than that many seconds remain.
- ``lifetime`` is the time to live the entry was written with: its age is that minus the time it
  has left, both on the store's own clock (Redis's for Redis), so every replica agrees on it
  whatever its own clock says.

A hit checks the marker, fingerprint and generation with one ``startswith`` of the bytes it
expects; only a value that fails it is parsed further, to say why. An envelope is validated field
by field before anything of it is sent (a status that is no 2xx integer, a header name that is no
HTTP token or a value with a control character, a ``Vary`` header, which only an older deploy
stored, a body of the wrong type: a miss, never a 5xx),
and its framing headers (``content-length``, ``transfer-encoding``) are never replayed.

The route fingerprint
---------------------
:func:`route_fingerprint` names what a route renders: the response model's schema, the response
class, the status code, the ``response_model_*`` options, the handler's return annotation, the
coder and which decorator wrote it. A deploy that changes any of them changes the fingerprint, and
the entries the old code stored become misses instead of answers of the wrong shape (or errors).
It is computed from names and schemas only, never from addresses or salted hashes, so every
process and replica agrees on it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import inspect
import json
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from inspect import Parameter
from typing import Any, NamedTuple

from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.utils import get_typed_return_annotation
from fastapi.routing import APIRoute
from pydantic import TypeAdapter

from commons.cache.memo import BoundedMemo

__all__ = [
    "BODY",
    "ENVELOPE",
    "NOT_STORED_HEADERS",
    "CachedResponse",
    "ParsedValue",
    "RejectReason",
    "ValidatedValues",
    "decode_payload",
    "encode_payload",
    "expected_head",
    "parse_any",
    "parse_value",
    "rejection_reason",
    "route_fingerprint",
    "stored_value",
]

_JSON = "application/json"
FORMAT_MARK = b'["commons.cache",3,'
#: The previous shape's marker: the same fields but ``lifetime``.
_PREVIOUS_MARK = b'["commons.cache",2,'
#: Payload kinds.
BODY = b"b"
ENVELOPE = b"e"
# What follows the head: the kind, the stale window and the lifetime (at most ten digits each).
_TAIL = re.compile(rb'"([be])",([0-9]{1,10}),([0-9]{1,10}),')
_PREVIOUS_TAIL = re.compile(rb'"([be])",([0-9]{1,10}),')
# HTTP's grammar (RFC 9110, 5.1 and 5.5): a name is a token; a value is visible characters
# (obs-text included) with single spaces or tabs between them, no control character anywhere.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?")
#: Headers never stored nor replayed from storage: a replay computes its own framing and type,
#: and a stored ``content-length`` or ``transfer-encoding`` that disagreed with the body would
#: make the server drop the connection.
NOT_STORED_HEADERS = frozenset(
    {"content-length", "content-type", "transfer-encoding", "connection"}
)


class RejectReason:
    """Why a stored value was not served (the ``reason`` of ``CacheEvents.rejected_entry``)."""

    #: Not written by this cache's format: garbage, another library's value, an old format.
    FORMAT = "format"
    #: Written by another version of the route (its response model, class, status or coder).
    FINGERPRINT = "fingerprint"


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A response as it is stored and replayed."""

    body: bytes
    status_code: int = 200
    media_type: str = _JSON
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def is_plain_json(self) -> bool:
        return self.status_code == 200 and self.media_type == _JSON and not self.headers


class ParsedValue(NamedTuple):
    """A stored value whose marker, fingerprint and generation were the expected ones."""

    raw: bytes
    kind: bytes
    stale_seconds: int
    #: Where the payload starts in ``raw`` (it ends one byte before the end).
    offset: int
    #: Seconds the entry was written to live; ``None`` in the previous shape.
    lifetime: int | None = None

    @property
    def payload(self) -> bytes:
        return self.raw[self.offset : -1]


def expected_head(fingerprint: bytes, generation: bytes) -> bytes:
    """The bytes a valid value starts with for this fingerprint and generation."""
    return b'%s"%s","%s",' % (FORMAT_MARK, fingerprint, generation)


def stored_value(
    *, head: bytes, kind: bytes, stale_seconds: int, lifetime: int, payload: bytes
) -> bytes:
    """The bytes to store: ``head`` (from :func:`expected_head`), then kind, stale window,
    lifetime and payload."""
    return b'%s"%s",%d,%d,%s]' % (head, kind, stale_seconds, lifetime, payload)


def parse_value(raw: bytes, head: bytes) -> ParsedValue | None:
    """``raw`` parsed, if it starts with ``head`` (or is the same value in the previous shape)
    and is well formed; else ``None``."""
    if raw[-1:] != b"]":
        return None
    if not raw.startswith(head):
        return _parse_previous(raw, head)
    tail = _TAIL.match(raw, len(head))
    if tail is None or tail.end() >= len(raw) - 1:
        return None
    return ParsedValue(raw, tail[1], int(tail[2]), tail.end(), int(tail[3]))


def _parse_previous(raw: bytes, head: bytes) -> ParsedValue | None:
    """``raw`` in the previous shape with ``head``'s fingerprint and generation (only a value
    that did not start with today's head gets here)."""
    fields = head[len(FORMAT_MARK) :]
    if not raw.startswith(_PREVIOUS_MARK) or not raw.startswith(fields, len(_PREVIOUS_MARK)):
        return None
    tail = _PREVIOUS_TAIL.match(raw, len(_PREVIOUS_MARK) + len(fields))
    if tail is None or tail.end() >= len(raw) - 1:
        return None
    return ParsedValue(raw, tail[1], int(tail[2]), tail.end())


#: A parsed value as :class:`ValidatedValues` remembers it: the stored bytes, the fingerprint and
#: generation they were checked against, then ParsedValue's fields after ``raw``.
_ParsedFields = tuple[bytes, bytes, bytes | None, bytes, int, int, int | None]


class ValidatedValues:
    """The last value validated under each key, so that a value is parsed once, not on every hit.

    The memory store and the near cache hand back the very bytes object they hold; bytes read
    from Redis itself are new every time, but equal ones are the same value (comparing is cheaper
    than parsing); others take the place of the last ones kept for their key. Each is kept as a
    plain tuple of bytes, ints and None, which the cyclic collector stops tracking, so a large
    working set adds nothing to a full collection (a ParsedValue, a tuple subclass, would stay
    tracked). Bounded in entries and bytes.
    """

    def __init__(self, max_entries: int = 16_384, max_bytes: int = 32 * 1024 * 1024) -> None:
        self._parsed = BoundedMemo[str, _ParsedFields](
            max_entries, max_bytes, admit_seen_twice=True
        )

    def validated(
        self, key: str, raw: bytes, fingerprint: bytes, generation: bytes | None
    ) -> ParsedValue | None:
        """``raw`` parsed if it is a value of this ``fingerprint`` and ``generation`` (``None``:
        a store without generations); else ``None`` (:func:`rejection_reason` says why)."""
        known = self._parsed.get(key)
        if (
            known is not None
            and (known[0] is raw or known[0] == raw)
            and known[1] == fingerprint
            and known[2] == generation
        ):
            return ParsedValue(known[0], known[3], known[4], known[5], known[6])
        parsed = parse_value(raw, expected_head(fingerprint, generation or b""))
        if parsed is not None:
            fields = (raw, fingerprint, generation, *parsed[1:])
            # A plain str: a key that knows its scope and route (a ``ScopedKey``) is an object the
            # collector walks, with its scope; one per remembered key makes full collections long.
            self._parsed.put(str(key), fields, len(key) + len(raw))
        return parsed


def parse_any(raw: bytes) -> tuple[bytes, bytes, ParsedValue] | None:
    """``raw`` parsed whatever its fingerprint and generation: those two, and the value.

    For inspection (operators, tests); a hit uses :func:`parse_value` with the head it expects.
    """
    mark = next((m for m in (FORMAT_MARK, _PREVIOUS_MARK) if raw.startswith(m + b'"')), None)
    if mark is None:
        return None
    start = len(mark) + 1
    end = raw.find(b'"', start)
    if end < 0 or raw[end : end + 3] != b'","':
        return None
    generation_end = raw.find(b'",', end + 3)
    if generation_end < 0:
        return None
    parsed = parse_value(raw, FORMAT_MARK + raw[len(mark) : generation_end + 2])
    if parsed is None:
        return None
    return raw[start:end], raw[end + 3 : generation_end], parsed


def rejection_reason(raw: bytes, fingerprint: bytes) -> str | None:
    """Why ``raw`` did not parse: a :class:`RejectReason`, or ``None`` for another generation.

    Only called for a value that :func:`parse_value` refused, so it may take its time.
    """
    parsed = parse_any(raw)
    if parsed is None:
        return RejectReason.FORMAT
    return RejectReason.FINGERPRINT if parsed[0] != fingerprint else None


def encode_payload(response: CachedResponse) -> tuple[bytes, bytes]:
    """The kind and payload to store for ``response``."""
    if response.is_plain_json:
        return BODY, response.body
    envelope: dict[str, object] = {
        "status": response.status_code,
        "media_type": response.media_type,
        "headers": [list(pair) for pair in response.headers],
    }
    try:
        envelope["body"] = response.body.decode("utf-8")
    except UnicodeDecodeError:
        envelope["body_base64"] = base64.b64encode(response.body).decode("ascii")
    return ENVELOPE, json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode()


def decode_payload(kind: bytes, payload: bytes) -> CachedResponse | None:
    """The response stored as ``payload``; ``None`` if this cache cannot have written it."""
    if kind == BODY:
        return CachedResponse(payload)
    try:
        envelope = json.loads(payload, parse_constant=_refuse_constant)
        return _checked_envelope(envelope)
    except (ValueError, TypeError, KeyError, UnicodeError, binascii.Error, RecursionError):
        return None


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is no JSON value")


def _sendable(text: object, grammar: re.Pattern[str] = _FIELD_VALUE) -> str:
    """``text`` if it is a header value (or, with ``_TOKEN``, a name) a server can send."""
    if not isinstance(text, str) or grammar.fullmatch(text) is None:
        raise ValueError("not a header text")
    text.encode("latin-1")
    return text


def _checked_envelope(envelope: object) -> CachedResponse | None:
    if not isinstance(envelope, dict):
        return None
    status = envelope["status"]
    if type(status) is not int or not 200 <= status < 300:
        return None
    headers = envelope["headers"]
    if not isinstance(headers, list):
        return None
    pairs: list[tuple[str, str]] = []
    for pair in headers:
        if not isinstance(pair, list) or len(pair) != 2:
            return None
        name, value = _sendable(pair[0], _TOKEN), _sendable(pair[1])
        if name.lower() in ("vary", "set-cookie"):
            # Never stored by this version (an older deploy's or another writer's entry): one
            # request's cookie or an answer its key does not vary on, never anyone else's.
            return None
        if name.lower() not in NOT_STORED_HEADERS:
            pairs.append((name, value))
    if "body" in envelope:
        text = envelope["body"]
        if not isinstance(text, str):
            return None
        body = text.encode("utf-8")
    else:
        encoded = envelope["body_base64"]
        if not isinstance(encoded, str):
            return None
        body = base64.b64decode(encoded, validate=True)
    return CachedResponse(body, status, _sendable(envelope["media_type"]), tuple(pairs))


# -- the route fingerprint -----------------------------------------------------------------


def _schema(annotation: Any) -> Any:
    if annotation is None or annotation is Parameter.empty:
        return None
    try:
        return TypeAdapter(annotation).json_schema(mode="serialization")
    except Exception:  # a type pydantic cannot describe: its (address-free) name stands in
        return _name(annotation)


def _name(thing: Any) -> str | None:
    if thing is None:
        return None
    if isinstance(thing, type):
        return f"{thing.__module__}.{thing.__qualname__}"
    return str(thing).split(" at 0x")[0]


def _stable(value: Any) -> Any:
    """``value`` in a form whose JSON is the same in every process (sets sorted)."""
    if isinstance(value, (set, frozenset)):
        return sorted(map(_stable, value), key=repr)
    if isinstance(value, dict):
        return {str(key): _stable(item) for key, item in value.items()}
    return value


def _describe(route: Any, handler: Any, producer: str, coder: Any) -> list[Any]:
    parts: list[Any] = [producer, _name(coder)]
    if isinstance(route, APIRoute):
        response_class = route.response_class
        if isinstance(response_class, DefaultPlaceholder):
            response_class = response_class.value
        parts += [
            _schema(route.response_model),
            _name(response_class),
            route.status_code,
            _stable(route.response_model_include),
            _stable(route.response_model_exclude),
            route.response_model_by_alias,
            route.response_model_exclude_unset,
            route.response_model_exclude_defaults,
            route.response_model_exclude_none,
        ]
    if callable(handler):
        try:
            parts.append(_schema(get_typed_return_annotation(handler)))
        except Exception:  # an annotation that does not resolve: its text stands in
            parts.append(str(inspect.signature(handler).return_annotation))
    return parts


_FINGERPRINTS_MAX = 4096
_fingerprints: dict[tuple[int, int, str, int], tuple[Callable[[], Any], Callable[[], Any], bytes]]
_fingerprints = {}


def _referent(thing: Any) -> Callable[[], Any]:
    """A weak reference where ``thing`` allows one, else a strong stand-in."""
    try:
        return weakref.ref(thing)
    except TypeError:
        return lambda: thing


def route_fingerprint(route: Any, handler: Any, *, producer: str, coder: Any = None) -> bytes:
    """16 hex digits naming what ``route`` (and ``handler``) render, as written by ``producer``.

    Computed once per route, handler, producer and coder (the schema takes milliseconds).
    """
    memo_key = (id(route), id(handler), producer, id(coder))
    known = _fingerprints.get(memo_key)
    if known is not None and known[0]() is route and known[1]() is handler:
        return known[2]
    text = json.dumps(_describe(route, handler, producer, coder), sort_keys=True, default=_name)
    fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16].encode()
    if len(_fingerprints) >= _FINGERPRINTS_MAX:
        _fingerprints.clear()
    _fingerprints[memo_key] = (_referent(route), _referent(handler), fingerprint)
    return fingerprint
