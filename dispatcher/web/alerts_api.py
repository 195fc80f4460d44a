"""``POST /api/alerts``: the anti-fraud centre's systems post an alert, authenticated by an API key.

The key comes as ``Authorization: Bearer <key>`` (or ``X-API-Key``); only its sha256 is stored
(``dispatch apikeys add``). No key or an unknown one is 401, a revoked one 403, bad input 400/422
with one line naming the field: in every refusal nothing is written or sent. A repeated external
id answers 200 with the existing alert; a new alert 201.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .. import alerting
from ..errors import DispatchError, InputError
from ..redact import scrub

if TYPE_CHECKING:
    from ..runtime import Runtime


def _key(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key", "").strip()


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": scrub(message)}
    if field:
        body["field"] = field
    return JSONResponse(body, status_code=status)


def routes(runtime: Runtime) -> list[Route]:
    async def post_alert(request: Request) -> JSONResponse:
        key = _key(request)
        if not key:
            return _error(401, "an API key is required (Authorization: Bearer <key>)")
        found = await run_in_threadpool(runtime.store.alerts.key_status, key)
        if found is None:
            return _error(401, "unknown API key")
        name, revoked = found
        if revoked:
            return _error(403, f"API key {name} is revoked")
        try:
            data = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body is not JSON")
        if not isinstance(data, dict):
            return _error(400, "the body is a JSON object with phone and type")
        fields = {"phone": str, "type": str, "name": str, "source": str, "id": str}
        for field_name, kind in fields.items():
            if field_name in data and data[field_name] is not None and not isinstance(data[field_name], kind):
                return _error(422, "expected a string", field_name)
        unknown = sorted(set(data) - set(fields))
        if unknown:
            return _error(422, f"unknown field(s) {', '.join(unknown)}", unknown[0])
        for required in ("phone", "type"):
            if not data.get(required):
                return _error(422, "required field is missing", required)
        req = alerting.AlertRequest(
            phone=data["phone"],
            fraud_type=data["type"],
            name=data.get("name") or "",
            source=data.get("source"),
            external_id=data.get("id"),
            actor=f"api:{name}",
        )
        try:
            taken = await run_in_threadpool(alerting.send_alert, runtime, req)
        except InputError as exc:
            return _error(422, exc.message, exc.field)
        except DispatchError as exc:
            return _error(503, str(exc))
        body = {**alerting.alert_json(taken.alert), "created": taken.created, "fired": taken.fired}
        return JSONResponse(body, status_code=201 if taken.created else 200)

    return [Route("/api/alerts", post_alert, methods=["POST"])]
