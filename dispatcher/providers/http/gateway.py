"""Generic HTTP adapter (``DISPATCH_GATEWAY=http``): a carrier or SMS platform plugged in by a config file.

Chinese carriers and domestic SMS platforms each have their own JSON or form API;
most take many numbers with one text in one call. Rather than code per provider,
one file (YAML or JSON, ``DISPATCH_HTTP_CONFIG``) says::

    url: https://sms.example.cn/v2/send          # required
    method: POST                                 # default POST
    timeout: 10                                  # seconds; default DISPATCH_GATEWAY_TIMEOUT
    headers:                                     # ${NAME}: a DISPATCH_HTTP_SECRET_* variable
      Authorization: "Bearer ${DISPATCH_HTTP_SECRET_CARRIER_TOKEN}"
    body:
      format: json                               # json | form
      template:                                  # {to} {to_list} {to_csv} {body} {key} {run_id} {campaign_id}
        mobiles: "{to_list}"
        content: "{body}"
    response:
      message_id: data.batch_id                  # dotted path into the JSON reply
      error_code: code
      success_codes: ["0"]                       # error codes that mean "accepted"
    permanent_codes: ["1001", "1002"]            # fail at once
    retryable_codes: ["2001"]                    # nothing was sent; try again with backoff
    unavailable_codes: ["5001"]                  # "not accepted, service down": a failover list tries the next
    opt_out_codes: ["1003"]                      # fail and opt the number out
    batch:                                       # optional: many numbers, one text, one call
      max_size: 500
      results: data.results                      # optional per-number results (list)
      result_to: mobile
      result_message_id: msgid
      result_error_code: code
    status:                                      # optional: ask for a message's fate by its id
      url: https://sms.example.cn/v2/report?id={provider_id}   # GET, with the headers above
      status: data.state                         # dotted path to the provider's status word
      error_code: data.err                       # optional
      states: {DELIVRD: delivered, UNDELIV: undelivered, EXPIRED: undelivered, REJECTD: failed}
    lookup:                                      # optional: did you take the message with this key?
      url: https://sms.example.cn/v2/query?out_id={key}        # GET, with the headers above; {to} too
      message_id: data.msgid                     # 200 with an id: taken; 404: never taken

A bad file is an ``InputError`` naming ``file:line:column: field``: the command
exits 2 before anything is written or sent. Secrets are substituted when the file
is loaded and redacted from every trace. Only variables named ``DISPATCH_HTTP_SECRET_*``
can be substituted: a config file is data from outside the program and must not be
able to send its own settings (the session secret, the database URL) to a provider.
HTTP 429 and refused connections are retried (a refused or unresolvable connection, and
``unavailable_codes``, let a failover list hand the message to its next provider), 5xx, read timeouts and a 2xx reply
that is not JSON are ambiguous (the row goes to ``unknown``).

Only a config with a ``lookup`` section makes the adapter ``can_lookup``: rows a worker
left in flight (it died, or its host was cut off) and ambiguous sends are then settled by
asking the provider about the delivery key (``{run_id}:{phone}``: the provider finds it by the
``{key}`` or ``{run_id}`` the body template sent, or by number) instead of waiting for an
operator. Any answer other than a 200 with an id or a 404 fails the lookup: nothing is
sent again on a guess.

Only a config with a ``status`` section makes the adapter ``can_fetch_status``: the
delivery-report sweep then asks that URL about messages whose report never came (a
404 means the provider does not know the id; a word not in ``states`` is not final).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ... import safeyaml
from ...charcheck import first_bad_text
from ...errors import (
    AmbiguousSendError,
    InputError,
    PermanentSendError,
    RetryableSendError,
    SendError,
    UnavailableSendError,
)
from ...settings import GATEWAY_SECRET_PREFIX
from ..base import BaseGateway, LookupRequest, MessageStatus, OutgoingMessage, SendResult
from ..httptrace import TracedHttp, collecting
from ..redaction import Redactor

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PLACEHOLDER_RE = re.compile(r"\{(to|to_list|to_csv|body|key|run_id|campaign_id)\}")


class HttpConfigError(InputError):
    """The HTTP adapter's config file cannot be used."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BodySpec(_Model):
    format: Literal["json", "form"] = "json"
    template: dict[str, Any]


class ResponseSpec(_Model):
    message_id: str
    error_code: str | None = None
    success_codes: list[str] = Field(default_factory=list)


class BatchSpec(_Model):
    max_size: int = Field(100, ge=1, le=10_000)
    results: str | None = None
    result_to: str = "to"
    result_message_id: str = "message_id"
    result_error_code: str | None = None


#: what a status word may mean: the words ``store.apply_status`` understands
StatusWord = Literal["delivered", "undelivered", "failed", "sent"]


class StatusSpec(_Model):
    url: str
    status: str
    error_code: str | None = None
    #: the provider's words -> ours; without it the provider's word is taken as is
    states: dict[str, StatusWord] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("expected an http:// or https:// URL")
        if "{provider_id}" not in value:
            raise ValueError("the status URL never names the message: use {provider_id}")
        return value


class LookupSpec(_Model):
    url: str
    #: dotted path to the provider's message id in a 200 reply: the message was taken
    message_id: str

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("expected an http:// or https:// URL")
        if "{key}" not in value and "{to}" not in value:
            raise ValueError("the lookup URL never names the message: use {key} (and {to} if the provider needs it)")
        return value


class HttpConfig(_Model):
    url: str
    method: Literal["POST", "PUT", "GET"] = "POST"
    timeout: float | None = Field(None, gt=0, le=300)
    headers: dict[str, str] = Field(default_factory=dict)
    body: BodySpec
    response: ResponseSpec
    permanent_codes: list[str] = Field(default_factory=list)
    retryable_codes: list[str] = Field(default_factory=list)
    #: codes by which the provider says it took nothing because it cannot take anything now
    unavailable_codes: list[str] = Field(default_factory=list)
    opt_out_codes: list[str] = Field(default_factory=list)
    batch: BatchSpec | None = None
    status: StatusSpec | None = None
    lookup: LookupSpec | None = None
    #: the values substituted for ${NAME}: redacted from every trace
    secrets: list[str] = Field(default_factory=list, exclude=True)
    source: str = Field("", exclude=True)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("expected an http:// or https:// URL")
        return value

    @field_validator(
        "permanent_codes", "retryable_codes", "unavailable_codes", "opt_out_codes", "response", mode="before"
    )
    @classmethod
    def _codes_as_text(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [str(v) for v in value]
        if isinstance(value, dict) and "success_codes" in value and isinstance(value["success_codes"], list):
            return {**value, "success_codes": [str(v) for v in value["success_codes"]]}
        return value


def _marks(node: yaml.Node, path: tuple[Any, ...], out: dict[tuple[Any, ...], tuple[int, int]]) -> None:
    out[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            _marks(value_node, (*path, key_node.value), out)
            out[(*path, key_node.value)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _marks(item, (*path, index), out)


def _position(marks: Mapping[tuple[Any, ...], tuple[int, int]], loc: tuple[Any, ...]) -> tuple[int, int]:
    key = loc
    while key:
        if key in marks:
            return marks[key]
        key = key[:-1]
    return marks.get((), (1, 1))


def _substitute_env(
    value: Any,
    env: Mapping[str, str],
    loc: tuple[Any, ...],
    found: list[str],
    missing: list[tuple[tuple[Any, ...], str]],
) -> Any:
    if isinstance(value, str):

        def repl(match: re.Match[str]) -> str:
            name = match.group(1)
            if not name.startswith(GATEWAY_SECRET_PREFIX):
                missing.append((loc, f"${{{name}}}: only {GATEWAY_SECRET_PREFIX}* variables can be substituted"))
                return ""
            if name not in env or env[name] == "":
                missing.append((loc, f"environment variable {name} is not set"))
                return ""
            found.append(env[name])
            return env[name]

        return _ENV_RE.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute_env(v, env, (*loc, k), found, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_env(v, env, (*loc, i), found, missing) for i, v in enumerate(value)]
    return value


def load_config(path: Path, *, env: Mapping[str, str], section: str | None = None) -> HttpConfig:
    """Read and check the config file (or one ``section`` of it).

    Every problem is an ``HttpConfigError`` at its line, so the command exits 2 before sending.
    """
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise HttpConfigError("file not found", path=where, field="DISPATCH_HTTP_CONFIG") from exc
    except (UnicodeDecodeError, OSError) as exc:
        raise HttpConfigError(f"cannot read: {exc}", path=where) from exc
    node, data = safeyaml.load_or_fail(text, where, HttpConfigError, "invalid YAML/JSON")
    if not isinstance(data, dict) or node is None:
        raise HttpConfigError("expected a mapping with url, body and response", path=where, line=1)
    marks: dict[tuple[Any, ...], tuple[int, int]] = {}
    _marks(node, (), marks)
    prefix: tuple[Any, ...] = ()
    if section is not None:
        if not isinstance(data.get(section), dict):
            line, column = _position(marks, (section,))
            raise HttpConfigError("required section is missing", path=where, line=line, column=column, field=section)
        data, prefix = data[section], (section,)
        marks = {key[1:]: pos for key, pos in marks.items() if key[:1] == prefix} | {(): marks[prefix]}
    bad = first_bad_text(data)  # a NUL or line break would reach a header or the provider's request as is
    if bad:
        loc, reason = bad
        line, column = _position(marks, loc)
        raise HttpConfigError(reason, path=where, line=line, column=column, field=".".join(map(str, (*prefix, *loc))))
    secrets: list[str] = []
    missing: list[tuple[tuple[Any, ...], str]] = []
    resolved = _substitute_env(data, env, (), secrets, missing)
    if missing:
        loc, problem = missing[0]
        line, column = _position(marks, loc)
        raise HttpConfigError(
            problem,
            path=where,
            line=line,
            column=column,
            field=".".join(map(str, (*prefix, *loc))),
        )
    try:
        config = HttpConfig.model_validate({**resolved, "secrets": secrets, "source": where})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        line, column = _position(marks, loc)
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field (check its spelling)"
        elif first["type"] == "missing":
            message = "required field is missing"
        raise HttpConfigError(
            message, path=where, line=line, column=column, field=".".join(map(str, (*prefix, *loc)))
        ) from exc
    placeholders = set(_PLACEHOLDER_RE.findall(json.dumps(config.body.template)))
    if not placeholders & {"to", "to_list", "to_csv"}:
        line, column = _position(marks, ("body", "template"))
        raise HttpConfigError(
            "the body template never names the recipient: use {to}, {to_list} or {to_csv}",
            path=where,
            line=line,
            column=column,
            field=".".join((*prefix, "body.template")),
        )
    if config.batch is None and placeholders & {"to_list", "to_csv"}:
        line, column = _position(marks, ("body", "template"))
        raise HttpConfigError(
            "{to_list}/{to_csv} need a batch section",
            path=where,
            line=line,
            column=column,
            field=".".join((*prefix, "body.template")),
        )
    return config


def dig(data: Any, path: str | None) -> Any:
    """``data.results.0.msgid`` style lookup; None when any step is missing."""
    if not path:
        return None
    node = data
    for part in path.split("."):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
        if node is None:
            return None
    return node


def _fill(template: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(template, str):
        whole = _PLACEHOLDER_RE.fullmatch(template)
        if whole:
            return values[whole.group(1)]  # "{to_list}" alone becomes the list itself
        return _PLACEHOLDER_RE.sub(lambda m: str(values[m.group(1)]), template)
    if isinstance(template, dict):
        return {k: _fill(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, values) for v in template]
    return template


def calls_for(messages: Sequence[OutgoingMessage], max_size: int) -> list[list[int]]:
    """The carrier calls a chunk makes in batch mode: indexes of the messages with the same text,
    in order of first appearance, at most ``max_size`` numbers a call. A text personalised per
    recipient (a name first) makes one call per number: ``dispatch preview`` shows that cost."""
    by_text: dict[str, list[int]] = {}
    for index, message in enumerate(messages):
        by_text.setdefault(message.body, []).append(index)
    return [
        indexes[start : start + max_size] for indexes in by_text.values() for start in range(0, len(indexes), max_size)
    ]


class HttpGateway(BaseGateway):
    name = "http"
    #: without a ``lookup`` section a provider cannot be asked "did you take this message?": unknown rows
    #: wait for an operator
    can_lookup = False

    def __init__(
        self,
        config: HttpConfig,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        concurrency: int = 1,
        connections: int | None = None,
    ) -> None:
        self.config = config
        self.redactor = Redactor(config.secrets)
        # one keep-alive connection per call in flight (``connections``: when another drives the calls)
        self.http = TracedHttp(
            redactor=self.redactor,
            timeout=config.timeout or timeout,
            transport=transport,
            max_connections=max(20, connections or concurrency),
        )
        # up to ``concurrency`` calls in flight: one per message, or in batch mode one per call
        self.drive_concurrently(concurrency)
        #: numbers one call can carry: the sender hands over chunks this large so batches stay whole
        self.batch_capacity = config.batch.max_size if config.batch is not None else 1
        #: declared by the config: only a provider with a status URL can be asked what became of a message
        self.can_fetch_status = config.status is not None
        #: and only one with a lookup URL whether it took a message at all
        self.can_lookup = config.lookup is not None

    # ------------------------------------------------------------------ one call

    def _call(self, messages: Sequence[OutgoingMessage]) -> tuple[Any, list[dict[str, Any]]]:
        """One HTTP exchange for ``messages`` (one, or a batch sharing one text): (JSON reply, trace)."""
        first = messages[0]
        numbers = [m.to for m in messages]
        values = {
            "to": first.to,
            "to_list": numbers,
            "to_csv": ",".join(numbers),
            "body": first.body,
            "key": first.key,
            "run_id": first.run_id,
            "campaign_id": first.campaign_id,
        }
        payload = _fill(self.config.body.template, values)
        kwargs: dict[str, Any] = {"headers": self.config.headers}
        if self.config.method == "GET":
            kwargs["params"] = payload
        elif self.config.body.format == "json":
            kwargs["json"] = payload
        else:
            kwargs["data"] = {
                k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in payload.items()
            }
        with collecting() as trace:
            try:
                response = self.http.request(self.config.method, self.config.url, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # refused or unresolvable: not a byte of the request reached the provider
                error: SendError = UnavailableSendError(f"could not connect: {type(exc).__name__}", code="http.connect")
                error.trace = list(trace)
                raise error from exc
            except httpx.PoolTimeout as exc:
                error = RetryableSendError(f"could not connect: {type(exc).__name__}", code="http.connect")
                error.trace = list(trace)
                raise error from exc
            except httpx.HTTPError as exc:
                error = AmbiguousSendError(f"no reply: {type(exc).__name__}", code="http.timeout")
                error.trace = list(trace)
                raise error from exc
        try:
            data: Any = response.json()
        except ValueError:
            data = None
            if 200 <= response.status_code < 300:
                # the provider took the request but its answer cannot be read: the SMS may go out
                raise self._with(
                    AmbiguousSendError(
                        f"HTTP {response.status_code} with a reply that is not JSON", code="http.bad_provider_response"
                    ),
                    trace,
                ) from None
        if response.status_code == 429:
            raise self._with(RetryableSendError("rate limited (HTTP 429)", code="http.429"), trace)
        if response.status_code >= 500:
            raise self._with(
                AmbiguousSendError(f"HTTP {response.status_code}", code=f"http.{response.status_code}"), trace
            )
        code = dig(data, self.config.response.error_code)
        if response.status_code >= 400 and code is None:
            raise self._with(
                PermanentSendError(f"HTTP {response.status_code}", code=f"http.{response.status_code}"), trace
            )
        if code is not None and not self._accepted(code):
            raise self._with(self.classify(str(code)), trace)
        return data, list(trace)

    def _accepted(self, code: Any) -> bool:
        success = self.config.response.success_codes
        if success:
            return str(code) in success
        # no success list: any code the config does not name as a failure means "accepted"
        c = self.config
        return str(code) not in {*c.permanent_codes, *c.retryable_codes, *c.unavailable_codes, *c.opt_out_codes}

    @staticmethod
    def _with(error: SendError, trace: list[dict[str, Any]]) -> SendError:
        error.trace = list(trace)
        return error

    def classify(self, code: str) -> SendError:
        """One table: the provider's error code -> retry, fail, or fail and opt out (default: fail)."""
        label = f"http.{code}"
        if code in self.config.opt_out_codes:
            return PermanentSendError(f"provider code {code}: recipient opted out", code=label, opt_out=True)
        if code in self.config.unavailable_codes:
            return UnavailableSendError(f"provider code {code}: not accepted, the service is unavailable", code=label)
        if code in self.config.retryable_codes:
            return RetryableSendError(f"provider code {code}", code=label)
        return PermanentSendError(f"provider code {code}", code=label)

    # ------------------------------------------------------------------ protocol

    def send(self, message: OutgoingMessage) -> SendResult:
        if self.config.batch is not None:
            result = self.send_many([message])[0]
            if isinstance(result, SendError):
                raise result
            return result
        data, trace = self._call([message])
        provider_id = dig(data, self.config.response.message_id)
        if provider_id in (None, ""):
            raise self._with(PermanentSendError("the reply carries no message id", code="http.no_id"), trace)
        return SendResult(provider_id=str(provider_id), status="accepted", trace=trace)

    def send_many(self, messages: Sequence[OutgoingMessage]) -> list[SendResult | SendError]:
        """Without a batch section, one call per message; with one, one call per text: the messages of
        the chunk that say the same thing, up to ``max_size`` numbers a call. Either way up to
        ``concurrency`` calls are in flight at once, and the answers come back per message, in order."""
        batch = self.config.batch
        if batch is None:
            return super().send_many(messages)
        calls = calls_for(messages, batch.max_size)
        results: list[SendResult | SendError | None] = [None] * len(messages)
        for indexes, outcomes in zip(calls, self._calls([[messages[i] for i in c] for c in calls]), strict=True):
            for index, outcome in zip(indexes, outcomes, strict=True):
                results[index] = outcome
        return [r for r in results if r is not None]

    def _calls(self, calls: list[list[OutgoingMessage]]) -> list[list[SendResult | SendError]]:
        """Each call's answers; the calls run ``concurrency`` at a time (``_send_chunk`` never raises)."""
        if self.handover is None:
            return [self._send_chunk(call) for call in calls]
        # the pool bounds calls in flight, not numbers: a call of 500 numbers is one request
        answers = self.handover.run(self._send_chunk, calls)
        return [a if isinstance(a, list) else [a] * len(call) for a, call in zip(answers, calls, strict=True)]

    def _send_chunk(self, chunk: Sequence[OutgoingMessage]) -> list[SendResult | SendError]:
        batch = self.config.batch
        assert batch is not None
        try:
            data, trace = self._call(chunk)
        except SendError as exc:
            return [exc] * len(chunk)
        # the exchange is shared: keep it once, on the first message of the call, and point the others at it
        shared = [{"batch_of": len(chunk), "see": "first message of this call"}]
        call_id = dig(data, self.config.response.message_id)
        per_number: dict[str, dict[str, Any]] = {}
        if batch.results:
            for item in dig(data, batch.results) or []:
                if isinstance(item, dict) and dig(item, batch.result_to) is not None:
                    per_number[str(dig(item, batch.result_to))] = item
        out: list[SendResult | SendError] = []
        for position, message in enumerate(chunk):
            this_trace = trace if position == 0 else shared
            if batch.results:
                item = per_number.get(message.to)
                if item is None:
                    error: SendError = AmbiguousSendError(
                        "the reply does not mention this number", code="http.no_result"
                    )
                    error.trace = this_trace
                    out.append(error)
                    continue
                code = dig(item, batch.result_error_code)
                if code is not None and not self._accepted(code):
                    error = self.classify(str(code))
                    error.trace = this_trace
                    out.append(error)
                    continue
                provider_id = dig(item, batch.result_message_id) or (f"{call_id}#{position}" if call_id else None)
            else:
                provider_id = f"{call_id}#{position}" if call_id not in (None, "") else None
            if provider_id in (None, ""):
                error = PermanentSendError("the reply carries no message id", code="http.no_id")
                error.trace = this_trace
                out.append(error)
                continue
            out.append(SendResult(provider_id=str(provider_id), status="accepted", trace=this_trace))
        return out

    def lookup(self, requests: Sequence[LookupRequest]) -> dict[str, SendResult]:
        """One GET of the lookup URL per key: the keys the provider says it took, with its message ids.

        A 404 means "never taken"; any other answer without an id (an error, a timeout) raises a
        ``RetryableSendError``, so the caller leaves the rows where they are rather than resend them.
        """
        spec = self.config.lookup
        if spec is None:
            return {}
        found: dict[str, SendResult] = {}
        for request in requests:
            url = spec.url.replace("{key}", quote(request.key, safe="")).replace("{to}", quote(request.to, safe=""))
            got = self._get_json(url, "lookup")
            if got is None:
                continue
            response, data, trace = got
            provider_id = dig(data, spec.message_id)
            if provider_id in (None, ""):
                raise self._with(
                    RetryableSendError(f"lookup: HTTP {response.status_code} without a message id", code="http.lookup"),
                    trace,
                )
            found[request.key] = SendResult(provider_id=str(provider_id), status="accepted", trace=list(trace))
        return found

    def _get_json(self, url: str, what: str) -> tuple[httpx.Response, Any, list[dict[str, Any]]] | None:
        """One traced GET of a lookup or status URL: None for a 404 (the provider does not know it), else
        the response, its JSON (None when it is not JSON or not a success) and the trace; no reply at all
        raises ``RetryableSendError`` (``http.<what>_unreachable``), so nothing is decided on a guess."""
        with collecting() as trace:
            try:
                response = self.http.request("GET", url, headers=self.config.headers)
            except httpx.HTTPError as exc:
                error = RetryableSendError(f"{what}: no reply: {type(exc).__name__}", code=f"http.{what}_unreachable")
                raise self._with(error, trace) from exc
        if response.status_code == 404:
            return None
        try:
            data: Any = response.json() if response.status_code < 300 else None
        except ValueError:
            data = None
        return response, data, trace

    def fetch_status(self, provider_ids: Sequence[str]) -> dict[str, MessageStatus]:
        """One GET of the status URL per message; ids the provider answers 404 for are left out."""
        spec = self.config.status
        if spec is None:
            raise NotImplementedError("this HTTP gateway's config declares no status URL")
        found: dict[str, MessageStatus] = {}
        for provider_id in provider_ids:
            url = spec.url.replace("{provider_id}", quote(provider_id, safe=""))
            got = self._get_json(url, "status")
            if got is None:
                continue
            response, data, trace = got
            word = dig(data, spec.status)
            if word is None:
                raise self._with(
                    RetryableSendError(f"status: HTTP {response.status_code} without a status", code="http.status"),
                    trace,
                )
            code = dig(data, spec.error_code)
            mapped = spec.states.get(str(word), str(word)) if spec.states else str(word)
            found[provider_id] = MessageStatus(
                mapped, error_code=f"http.{code}" if code not in (None, "") else None, trace=list(trace)
            )
        return found

    def close(self) -> None:
        super().close()  # the calls in flight finish before their client goes
        self.http.close()
