"""The idempotency key of a delivery: ``{run_id}:{phone}``.

Every row of a run gets one key per recipient (the phone number in E.164), written when
the run is created and handed to the gateway with each send, so a provider that is asked
again, or the ledger that digests the keys of a run, recognises the same recipient of the
same run. The format is defined here only: Python code calls ``delivery_key``; SQL that
builds keys in the database (``INSERT ... SELECT``) writes ``delivery_key_prefix(run_id)``
followed by the phone column.
"""

from __future__ import annotations

#: between the run id and the recipient's number
SEPARATOR = ":"


def delivery_key_prefix(run_id: str) -> str:
    """What every key of the run starts with; the phone number follows."""
    return run_id + SEPARATOR


def delivery_key(run_id: str, phone: str) -> str:
    """The key of the row of ``phone`` (E.164) in run ``run_id``."""
    return delivery_key_prefix(run_id) + phone
