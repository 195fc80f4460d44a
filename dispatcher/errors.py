"""Every error the dispatcher raises on purpose, in one tree.

The CLI maps the two top branches to exit codes: an ``InputError`` is the
operator's to fix (exit 2, one line naming file, line and field, nothing sent);
anything else under ``DispatchError`` is a runtime failure (exit 1). Gateway
adapters translate third-party exceptions into ``SendError`` at their boundary
(``raise SendError(...) from exc``) so the pipeline never sees a ``twilio`` or
``httpx`` exception and can decide on retries from ``retryable`` and ``code``
alone::

    DispatchError
    ├── InputError                 bad operator input; exit 2; carries path/line/column/field
    │   ├── CampaignError          campaign YAML: syntax, schema, unknown district/segment/owner
    │   ├── TemplateError          missing template, syntax error, undefined variable, too long
    │   ├── TargetsError           targets.yaml: syntax, schema, unknown department or town
    │   └── UsageError             unknown run id, impossible option combination
    ├── ConfigError                bad environment / settings (exit 2 as well: the operator fixes it)
    ├── StoreError                 the delivery log could not be read or written
    ├── BrokerError                the message broker could not be reached
    ├── GatewayDown                the gateway cannot take any message now (its outbox cannot be written)
    └── SendError                  one message could not be handed to a gateway; .retryable, .code
        ├── PermanentSendError     never retried (invalid number, recipient opted out, ...)
        ├── RetryableSendError     nothing was sent; safe to try again (rate limited, refused connection)
        │   └── UnavailableSendError   the provider proved it took nothing (refused connection, DNS failure,
        │                              "not accepted"): another provider may take the message
        └── AmbiguousSendError     the message may have gone out; look it up before resending
"""

from __future__ import annotations

from typing import Any


class DispatchError(Exception):
    """Base of every error raised on purpose by the dispatcher."""

    exit_code = 1


class InputError(DispatchError):
    """Operator input that cannot be used. Rendered as ``path:line:column: field: message``."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        column: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.column = column
        self.field = field

    def __str__(self) -> str:
        location = ""
        if self.path:
            location = self.path
            if self.line is not None:
                location += f":{self.line}"
                if self.column is not None:
                    location += f":{self.column}"
            location += ": "
        field = f"{self.field}: " if self.field else ""
        return f"{location}{field}{self.message}"


class CampaignError(InputError):
    """A campaign file that does not parse or does not validate."""


class TemplateError(InputError):
    """A message template that is missing, broken, needs absent variables or can never fit."""


class TargetsError(InputError):
    """The assessment targets file (``targets.yaml``) does not parse or does not validate."""


class UsageError(InputError):
    """A command asked for something that does not exist or cannot be combined."""


class ConfigError(DispatchError):
    """Settings from the environment that cannot be used."""

    exit_code = 2


class StoreError(DispatchError):
    """The delivery log could not be read or written."""


class BrokerError(DispatchError):
    """The message broker could not be reached."""


class GatewayDown(DispatchError):
    """The gateway as a whole cannot take messages (disk full, outbox unwritable). ``done`` holds the
    results of the messages of the call handed over before it failed; the rest were not. The batch
    records those, stops and releases its other rows; the run halts for an operator."""

    def __init__(self, message: str, *, done: list[Any] | None = None) -> None:
        super().__init__(message)
        self.done: list[Any] = done or []


class SendError(DispatchError):
    """One message could not be handed to the gateway.

    ``code`` is stable (it lands in the delivery log and in reports); ``retryable``
    tells the pipeline whether trying again can help.
    """

    retryable = False
    ambiguous = False

    def __init__(self, message: str, *, code: str, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        if retryable is not None:
            self.retryable = retryable
        #: redacted HTTP exchanges of the failed send, stored with the attempt like a success's
        self.trace: list[dict[str, Any]] = []
        #: the provider that answered, when a failover gateway chose among several (None: the only one)
        self.gateway: str | None = None
        #: providers tried first that proved they took nothing (failover), for the attempt log
        self.refusals: list[dict[str, Any]] = []


class PermanentSendError(SendError):
    """The gateway refused this message for good; trying again cannot help."""

    retryable = False

    def __init__(self, message: str, *, code: str, opt_out: bool = False) -> None:
        super().__init__(message, code=code, retryable=False)
        #: the recipient asked not to be messaged (e.g. Twilio 21610); the registry must record it
        self.opt_out = opt_out


class RetryableSendError(SendError):
    """Nothing was sent; it is safe to send again (after ``retry_after`` seconds if given)."""

    retryable = True

    def __init__(self, message: str, *, code: str, retry_after: float | None = None) -> None:
        super().__init__(message, code=code, retryable=True)
        self.retry_after = retry_after


class UnavailableSendError(RetryableSendError):
    """The provider proved it did not take the message because it cannot take any now: the
    connection was refused, its name did not resolve, or it answered with an explicit "not
    accepted". Nothing reached it, so a failover gateway may hand the message to the next provider;
    an ambiguous failure (timeout, 5xx after the request went out) is never one of these."""


class AmbiguousSendError(SendError):
    """The gateway may have sent the message (5xx, read timeout): look it up, never blindly resend."""

    retryable = False
    ambiguous = True
