"""Rendering a handler's result exactly as FastAPI would, so a cached answer is the uncached one.

Inside its route, a result is rendered through the route itself: its ``response_model`` (with the
``response_model_*`` options), ``response_class`` and ``status_code``, by FastAPI's own
``serialize_response``. Called outside a route (a handler invoked directly), the return
annotation plays the ``response_model`` and ``jsonable_encoder`` the rest, as FastAPI does for a
route without a model.

What a route renders is also named by a fingerprint that every stored value carries: that is the
stored format's (``entry.route_fingerprint``).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from inspect import Parameter, Signature
from typing import Any, ForwardRef, get_args

from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.utils import get_typed_return_annotation
from fastapi.encoders import jsonable_encoder
from fastapi.routing import APIRoute, serialize_response
from fastapi.utils import is_body_allowed_for_status_code
from pydantic import TypeAdapter
from starlette.responses import Response

__all__ = [
    "adapter_for",
    "has_forward_ref",
    "json_bytes",
    "render_as_route",
    "resolved_return_annotation",
]

_SERIALIZE_OPTIONS = frozenset(inspect.signature(serialize_response).parameters)


def json_bytes(value: Any) -> bytes:
    # The same rendering as FastAPI's JSONResponse.
    return json.dumps(
        jsonable_encoder(value), ensure_ascii=False, allow_nan=False, separators=(",", ":")
    ).encode("utf-8")


def adapter_for(annotation: Any) -> TypeAdapter[Any] | None:
    if annotation is None or annotation is Parameter.empty or has_forward_ref(annotation):
        return None
    if isinstance(annotation, type) and issubclass(annotation, Response):
        return None
    try:
        return TypeAdapter(annotation)
    except Exception:  # an annotation pydantic cannot handle falls back to FastAPI's encoder
        return None


async def render_as_route(
    route: APIRoute, result: Any, status_code: int | None, is_coroutine: bool
) -> Response:
    """``result`` rendered as FastAPI renders a non-Response result of ``route``."""
    status_code = status_code or route.status_code
    response_class = route.response_class
    is_default_class = isinstance(response_class, DefaultPlaceholder)
    actual_class: type[Response] = (
        response_class.value if isinstance(response_class, DefaultPlaceholder) else response_class
    )
    dump_json = (
        route.response_field is not None and is_default_class and "dump_json" in _SERIALIZE_OPTIONS
    )
    options: dict[str, Any] = {"dump_json": True} if dump_json else {}
    content = await serialize_response(
        field=route.response_field,
        response_content=result,
        include=route.response_model_include,
        exclude=route.response_model_exclude,
        by_alias=route.response_model_by_alias,
        exclude_unset=route.response_model_exclude_unset,
        exclude_defaults=route.response_model_exclude_defaults,
        exclude_none=route.response_model_exclude_none,
        is_coroutine=is_coroutine,
        **options,
    )
    if dump_json:
        response = Response(content=content, media_type="application/json")
    else:
        response = actual_class(content)
    if status_code is not None:
        response.status_code = status_code
        if not is_body_allowed_for_status_code(status_code):
            response.body = b""
            response.init_headers()
    return response


def has_forward_ref(annotation: Any) -> bool:
    if isinstance(annotation, (str, ForwardRef)):
        return True
    return any(has_forward_ref(arg) for arg in get_args(annotation))


def resolved_return_annotation(func: Callable[..., Any]) -> Any:
    """The return annotation FastAPI infers the route's ``response_model`` from.

    Empty when it names something FastAPI cannot resolve (a class local to a function): the
    handler's result is then rendered with ``jsonable_encoder``, as without a response model.
    """
    annotation = get_typed_return_annotation(func)
    if annotation is None or has_forward_ref(annotation):
        return Signature.empty
    return annotation
