"""The local outbox gateway: one JSON line per message in a file, for demos, drills and tests.

Several worker processes append to the same file under an exclusive ``flock``, so
lines never interleave. An append writes whole lines or nothing: a short write (disk
full, file-size limit) is cut back to where the append began and the call fails with
``GatewayDown`` (nothing handed over); a torn tail left by a crash mid-write is cut
off before the next append. ``lookup`` answers from the file itself, which is what
makes ``dispatch resume`` exact after ``kill -9``, so a line it cannot read is an
error, never skipped: skipping it could send that person again.

Fault injection (``DISPATCH_OUTBOX_FAIL_PERMANENT`` / ``_TRANSIENT``): listed
numbers fail with ``outbox.rejected`` (permanent) or ``outbox.busy`` (retryable,
nothing written); ``DISPATCH_OUTBOX_LATENCY_MS`` makes every message take that long
(a slow provider), and then messages are written one by one.

Delivery status: ``fetch_status`` answers from the file too, so drills exercise the
delivery-report sweep: a message in the file is ``delivered``, except to numbers in
``DISPATCH_OUTBOX_UNDELIVERED`` (``undelivered``) and ``DISPATCH_OUTBOX_NO_REPORT``
(still ``sent``: a carrier that never says what became of it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ...errors import DispatchError, GatewayDown, PermanentSendError, RetryableSendError, SendError
from ..base import BaseGateway, LookupRequest, MessageStatus, OutgoingMessage, SendResult

#: one encoder for every line: ``json.dumps`` with a non-default option builds a new encoder per call
encode_json = json.JSONEncoder(ensure_ascii=False).encode
#: how that encoder writes a string (its C function, non-ASCII kept as is)
encode_string = json.encoder.encode_basestring


class OutboxGateway(BaseGateway):
    name = "outbox"
    can_fetch_status = True

    def __init__(
        self,
        path: Path,
        *,
        fail_permanent: frozenset[str] = frozenset(),
        fail_transient: frozenset[str] = frozenset(),
        latency_ms: int = 0,
        undelivered: frozenset[str] = frozenset(),
        no_report: frozenset[str] = frozenset(),
    ) -> None:
        self.path = path
        self.undelivered = undelivered
        self.no_report = no_report
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fail_permanent = fail_permanent
        self.fail_transient = fail_transient
        self.latency = latency_ms / 1000
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        self._threads = threading.Lock()
        #: what ``fetch_status`` has read of the file so far: key -> number, and up to which byte
        self._sent_to: dict[str, str] = {}
        self._indexed_upto = 0
        self._index_lock = threading.Lock()

    def _line(self, message: OutgoingMessage, at: str) -> bytes:
        """The message's line: the JSON object ``encode_json`` would write for it, key for key.

        Written field by field with the encoder's own string function: encoding the dict took 2.7 µs a
        message, this 1.3, and a bulk batch writes one line per recipient.
        """
        q = encode_string
        return (
            f'{{"key": {q(message.key)}, "run_id": {q(message.run_id)}, "campaign_id": {q(message.campaign_id)}, '
            f'"to": {q(message.to)}, "body": {q(message.body)}, "parts": {int(message.parts)}, '
            f'"encoding": {q(message.encoding)}, "at": {q(at)}}}\n'
        ).encode()

    def _check(self, message: OutgoingMessage) -> None:
        if message.to in self.fail_permanent:
            raise PermanentSendError("outbox told to reject this number", code="outbox.rejected")
        if message.to in self.fail_transient:
            raise RetryableSendError("outbox told to refuse this number for now", code="outbox.busy")

    def _append(self, data: bytes) -> None:
        # flock excludes other processes only: threads of this process share the descriptor (and so
        # the lock), and one repairing the tail while another writes would cut a good line off
        with self._threads:
            self._append_locked(data)

    def _append_locked(self, data: bytes) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            start = _repair_tail(self._fd)
            view = memoryview(data)
            try:
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            except OSError as exc:
                # whole lines or nothing: cut the partial append off so the next line starts clean
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                raise GatewayDown(f"outbox {self.path} cannot be written: {exc.strerror or exc}") from exc
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def send(self, message: OutgoingMessage) -> SendResult:
        self._check(message)
        if self.latency:
            time.sleep(self.latency)
        self._append(self._line(message, datetime.now(UTC).isoformat()))
        return SendResult(provider_id=f"outbox:{message.key}")

    def send_many(self, messages: Sequence[OutgoingMessage]) -> list[SendResult | SendError]:
        """All accepted messages of a batch in one locked write (one line each)."""
        if self.latency:
            # a slow provider: hand over one by one so a crash can land between messages
            return super().send_many(messages)
        results: list[SendResult | SendError] = []
        lines: list[bytes] = []
        at = datetime.now(UTC).isoformat()  # the lines are written together, in one locked write
        for message in messages:
            try:
                self._check(message)
            except SendError as exc:
                results.append(exc)
                continue
            lines.append(self._line(message, at))
            results.append(SendResult(provider_id=f"outbox:{message.key}"))
        if lines:
            self._append(b"".join(lines))
        return results

    def lookup(self, requests: Sequence[LookupRequest]) -> dict[str, SendResult]:
        wanted = {r.key for r in requests}
        found: dict[str, SendResult] = {}
        for record in read_outbox(self.path):
            key = record.get("key")
            if key in wanted:
                found[key] = SendResult(provider_id=f"outbox:{key}")
        return found

    def fetch_status(self, provider_ids: Sequence[str]) -> dict[str, MessageStatus]:
        """Messages in the file are delivered, but for the numbers told to stay silent or fail."""
        recipients = self._recipients()
        found: dict[str, MessageStatus] = {}
        for provider_id in provider_ids:
            to = recipients.get(provider_id.removeprefix("outbox:"))
            if to is None:
                continue
            if to in self.no_report:
                found[provider_id] = MessageStatus("sent")
            elif to in self.undelivered:
                found[provider_id] = MessageStatus("undelivered", error_code="outbox.undelivered")
            else:
                found[provider_id] = MessageStatus("delivered")
        return found

    def _recipients(self) -> dict[str, str]:
        """Key -> number of every message in the file, read on from where the last call stopped.

        The file only grows by whole lines (a torn tail is never a message), so a sweep that asks
        in pages reads it once, not once per page.
        """
        with self._index_lock, self.path.open("rb") as fh:
            fh.seek(self._indexed_upto)
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise OutboxCorrupt(f"{self.path}: unreadable outbox line ({exc})") from exc
                if isinstance(record, dict) and isinstance(record.get("key"), str):
                    self._sent_to[record["key"]] = str(record.get("to"))
                self._indexed_upto += len(raw)
            return self._sent_to

    def close(self) -> None:
        with contextlib.suppress(OSError):  # closing twice is harmless
            os.close(self._fd)


def _repair_tail(fd: int) -> int:
    """Under the lock: cut an unterminated last line (a crash mid-append); returns the end offset."""
    end = os.lseek(fd, 0, os.SEEK_END)
    if end == 0 or os.pread(fd, 1, end - 1) == b"\n":
        return end
    # walk back to the last newline; a torn line is at most one append long
    pos = end
    while pos > 0:
        step = min(65536, pos)
        chunk = os.pread(fd, step, pos - step)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            pos = pos - step + nl + 1
            break
        pos -= step
    os.ftruncate(fd, pos)
    return pos


class OutboxCorrupt(DispatchError):
    """A line of the outbox cannot be read: what it holds cannot be known, so nothing is guessed."""


def read_outbox(path: Path) -> Iterator[dict[str, Any]]:
    """Every line of the outbox; an unterminated last line (a crash mid-append, never acknowledged as
    sent) is left out, any other line that does not parse raises ``OutboxCorrupt``."""
    if not path.exists():
        return
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                return
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise OutboxCorrupt(f"{path}:{number}: unreadable outbox line ({exc})") from exc
            if not isinstance(record, dict):
                raise OutboxCorrupt(f"{path}:{number}: unreadable outbox line (not a JSON object)")
            yield record
