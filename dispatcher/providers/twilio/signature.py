"""Twilio's one signature check, shared by its status callback, inbound replies and ringback TwiML.

``X-Twilio-Signature`` is an HMAC-SHA1 over the public URL and the form fields,
checked with ``twilio.request_validator.RequestValidator`` against
``DISPATCH_PUBLIC_URL`` because the proxy in front of us changes host and scheme.
Twilio signs the whole URL, query included, so a ringback's ``then`` cannot be
swapped by someone who does not hold the auth token.
"""

from __future__ import annotations

from starlette.requests import Request
from twilio.request_validator import RequestValidator

from ..inbound import form_fields


async def signed_params(request: Request, *, auth_token: str, public_url: str) -> dict[str, str] | None:
    """The form fields of a request Twilio signed (none for a GET), or None when the signature does not hold."""
    signature = request.headers.get("X-Twilio-Signature", "")
    if not signature or not auth_token or not public_url:
        return None
    params = await form_fields(request) if request.method == "POST" else {}
    url = public_url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
    if not RequestValidator(auth_token).validate(url, params, signature):
        return None
    return params
