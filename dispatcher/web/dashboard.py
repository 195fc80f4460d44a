# ruff: noqa: E501 - HTML and SVG fragments read better as whole lines than split mid-tag
"""The auditors' dashboard: runs and progress, coverage heat map, delivery rates, the quarter's
assessment against targets, ledger search, and campaign approvals.

Every page needs a login (accounts.py: roles ``auditor`` and ``operator``, scrypt
hashes, no default account). The session cookie carries a random session id
signed with HMAC-SHA256 under ``DISPATCH_SESSION_SECRET``; the session row and its
account are looked up on every request. An anonymous browser is sent to the login
page (303), any other anonymous client gets 401 and no data.

Numbers are masked for everyone; only an operator may tick "unmask" in the ledger
search or search by phone number, and each such view or search is appended to the
audit chain like a CLI export. Operators approve campaign versions other operators
submitted (``/dashboard/approvals``, the one form that changes anything). Sessions are server-side (accounts.py) and end at
once on logout, a password or role change, or ``users disable|remove``; every POST
carries a CSRF token (a cookie matched by a hidden field) and must come from our
own origin.
Plain HTML and inline SVG: the dashboard works with no internet (no CDN, no JS).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections import defaultdict
from datetime import datetime
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .. import accounts, alerting, approvals, audit, domain, reports, traces
from ..campaigns import LoadedCampaign, check_paths
from ..errors import InputError
from ..store import (
    DELIVERED,
    FAILED_STATES,
    HANDED_OVER_STATES,
    OPEN_STATES,
    REACHED_STATES,
    UNCONFIRMED,
    UNDELIVERED,
)
from ..targets import QUARTERS
from ..targets import load as load_targets

if TYPE_CHECKING:
    from ..runtime import Runtime
    from ..store import SqlStore

COOKIE = "dispatch_session"
CSRF_COOKIE = "dispatch_csrf"
#: where a page's forms get this browser's CSRF token (filled in by ``page``)
_CSRF_SLOT = "\x00csrf\x00"
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{20,100}$")
_HEADERS = {
    # pages carry personal data: never cached, never framed, nothing loaded from elsewhere
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'",
    "Referrer-Policy": "same-origin",
}


class Sessions:
    """Server-side sessions (accounts.py) behind a signed cookie ``<random id>.<HMAC-SHA256 of it>``.

    The signature turns a guessed or mangled cookie away before the database is asked;
    the row decides whether the session is still alive, so ending it takes effect at once.
    """

    def __init__(self, store: SqlStore, secret: str, max_age: int) -> None:
        # DISPATCH_SESSION_SECRET (checked for length by settings), else one kept in the delivery log
        self.store = store
        self.key = secret.encode() if secret else store.server_secret("session_key")
        self.max_age = max_age

    def _sign(self, session_id: str) -> str:
        return hmac.new(self.key, session_id.encode("ascii"), hashlib.sha256).hexdigest()

    def issue(self, account: accounts.Account) -> str:
        session_id = accounts.start_session(self.store, account, self.max_age)
        return f"{session_id}.{self._sign(session_id)}"

    def _id(self, value: str | None) -> str | None:
        """The session id of a well-formed, correctly signed cookie; None for anything else."""
        if not value or "." not in value or not value.isascii():
            return None
        session_id, sig = value.rsplit(".", 1)
        if not hmac.compare_digest(sig.encode("ascii"), self._sign(session_id).encode("ascii")):
            return None
        return session_id

    def read(self, value: str | None) -> accounts.Account | None:
        """The account of a live session; None when the cookie is forged, expired or its session ended."""
        session_id = self._id(value)
        return accounts.session_account(self.store, session_id) if session_id else None

    def end(self, value: str | None) -> None:
        session_id = self._id(value)
        if session_id:
            accounts.end_session(self.store, session_id)


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else ""


def same_origin(request: Request, public_url: str) -> bool:
    """A POST from our own pages: its Origin (or, without one, its Referer) is this site.

    Browsers send Origin on every cross-site POST; a request with neither header is not a
    browser acting for someone else, and still needs the CSRF token.
    """
    allowed = {_origin_of(str(request.base_url))}
    if public_url:
        allowed.add(_origin_of(public_url))
    origin = request.headers.get("origin")
    if origin is not None:
        return origin.lower() in allowed
    referer = request.headers.get("referer")
    if referer is not None:
        return _origin_of(referer) in allowed
    return True


# ------------------------------------------------------------------ HTML


_STYLE = """
body{font-family:system-ui,"Noto Sans CJK SC",sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;align-items:center}
header a{color:#fff;text-decoration:none}header form{margin-left:auto}
main{padding:1rem 1.2rem}table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #d8dce3;padding:.3rem .5rem;font-size:.85rem;text-align:right}
th{background:#eef1f5}td.l,th.l{text-align:left}.bar{background:#e3e7ee;width:10rem;height:.7rem}
.bar div{background:#2a9d8f;height:100%}.err{color:#b00020}.muted{color:#667}
form.search label{margin-right:.6rem}input,select{font-size:.85rem}
pre{background:#fff;border:1px solid #d8dce3;padding:.4rem;white-space:pre-wrap;font-size:.8rem;text-align:left}
"""


def _page(title: str, body: str, account: accounts.Account | None, csrf: str = "") -> HTMLResponse:
    nav = ""
    if account is not None:
        nav = (
            '<a href="/dashboard">Runs</a><a href="/dashboard/coverage">Coverage</a>'
            '<a href="/dashboard/rates">Delivery rates</a><a href="/dashboard/assessment">Assessment</a>'
            '<a href="/dashboard/ledger">Ledger</a>'
            + ('<a href="/dashboard/delivery">Delivery traces</a>' if account.may_unmask else "")
            + ('<a href="/dashboard/alerts">Alerts</a>' if account.role == "operator" else "")
            + '<a href="/dashboard/approvals">Approvals</a>'
            + f'<span class="muted">{escape(account.name)} ({escape(account.role)})</span>'
            f'<form method="post" action="/logout"><input type="hidden" name="csrf" value="{escape(csrf)}">'
            "<button>Log out</button></form>"
        )
    html = (
        f'<!doctype html><html lang="zh-CN"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><header><strong>反诈短信 · 审计</strong>{nav}</header>"
        f"<main><h1>{escape(title)}</h1>{body}</main></body></html>"
    )
    return HTMLResponse(html, headers=_HEADERS)


def _heat(percent: float) -> str:
    """Red (0%) through amber to green (100%): the cells an auditor must look at stand out."""
    hue = int(120 * max(0.0, min(percent, 100.0)) / 100)
    return f"hsl({hue},70%,{85 if percent == 0 else 70}%)"


# ------------------------------------------------------------------ routes


def routes(runtime: Runtime) -> list[Route]:
    store = runtime.store
    sessions = Sessions(store, runtime.settings.session_secret, runtime.settings.session_max_age)
    secure = runtime.settings.secure_cookies
    public_url = runtime.settings.public_url

    def current(request: Request) -> accounts.Account | None:
        return sessions.read(request.cookies.get(COOKIE))

    async def who(request: Request) -> accounts.Account | Response:
        account = await run_in_threadpool(current, request)
        if account is not None:
            return account
        if "text/html" in request.headers.get("accept", ""):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
        return JSONResponse({"error": "login required"}, status_code=401, headers={"WWW-Authenticate": "Cookie"})

    def csrf_token(request: Request) -> str:
        token = request.cookies.get(CSRF_COOKIE, "")
        return token if _TOKEN_RE.match(token) else ""

    def page(
        request: Request, title: str, body: str, account: accounts.Account | None, status: int = 200
    ) -> HTMLResponse:
        """A page whose forms carry the CSRF token of this browser (set as a cookie the first time)."""
        token = csrf_token(request)
        fresh = not token
        if fresh:
            token = secrets.token_urlsafe(32)
        response = _page(title, body.replace(_CSRF_SLOT, escape(token)), account, token)
        response.status_code = status
        if fresh:
            response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict", secure=secure)
        return response

    def forged(request: Request, form: dict[str, str]) -> bool:
        """A POST that did not come from a form we served to this browser."""
        token = csrf_token(request)
        given = form.get("csrf", "")
        if not token or not given.isascii() or not hmac.compare_digest(given.encode(), token.encode()):
            return True
        return not same_origin(request, public_url)

    async def read_form(request: Request) -> dict[str, str]:
        return dict(parse_qsl((await request.body()).decode("utf-8", "replace")))

    # ---------------------------------------------------------- login

    def login_form(
        request: Request, message: str = "", next_url: str = "/dashboard", status: int = 200
    ) -> HTMLResponse:
        body = (
            (f'<p class="err" role="alert">{escape(message)}</p>' if message else "")
            + '<form method="post" action="/login">'
            f'<input type="hidden" name="next" value="{escape(next_url)}">'
            f'<input type="hidden" name="csrf" value="{_CSRF_SLOT}">'
            '<p><label>Account <input name="name" autocomplete="username" required></label></p>'
            '<p><label>Password <input name="password" type="password" autocomplete="current-password" required>'
            '</label></p><p><button type="submit">Log in</button></p></form>'
        )
        return page(request, "Log in", body, None, status)

    async def login_page(request: Request) -> Response:
        return login_form(request, next_url=_safe_next(request.query_params.get("next")))

    async def login(request: Request) -> Response:
        form = await read_form(request)
        next_url = _safe_next(form.get("next"))
        if forged(request, form):
            return login_form(request, "The form expired or came from another site; log in again.", next_url, 403)
        name = form.get("name", "").strip()
        address = request.client.host if request.client else "unknown"
        try:
            account = await run_in_threadpool(accounts.login, store, name, form.get("password", ""), address)
        except accounts.Locked:
            return login_form(
                request, "Too many failed logins for this account; try again in a few minutes.", next_url, 429
            )
        if account is None:
            return login_form(request, "Wrong account name or password.", next_url, 401)
        response = RedirectResponse(next_url, status_code=303)
        response.set_cookie(
            COOKIE,
            await run_in_threadpool(sessions.issue, account),
            max_age=sessions.max_age,
            httponly=True,
            samesite="strict",
            secure=secure,
        )
        return response

    async def logout(request: Request) -> Response:
        form = await read_form(request)
        if forged(request, form):
            return Response("cross-site request refused", status_code=403)
        await run_in_threadpool(sessions.end, request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, httponly=True, samesite="strict", secure=secure)
        return response

    # ---------------------------------------------------------- pages

    async def runs_page(request: Request) -> Response:
        account = await who(request)
        if isinstance(account, Response):
            return account
        rows = await run_in_threadpool(_runs_with_progress, runtime)
        body = ['<table id="runs"><tr><th class="l">run</th><th class="l">campaign</th><th class="l">owner</th>'
                "<th>status</th><th>total</th><th>sent</th><th>delivered</th><th>undelivered</th>"
                "<th>unconfirmed</th><th>failed</th><th>open</th><th>progress</th></tr>"]  # fmt: skip
        for r in rows:
            pct = 100.0 * r["done"] / r["total"] if r["total"] else 100.0
            body.append(
                f'<tr><td class="l">{escape(r["id"])}</td><td class="l">{escape(r["campaign_id"])}</td>'
                f'<td class="l">{escape(r["owner_name"])}</td><td>{escape(r["status"])}</td><td>{r["total"]}</td>'
                f"<td>{r['sent']}</td><td>{r['delivered']}</td><td>{r['undelivered']}</td>"
                f"<td>{r['unconfirmed']}</td><td>{r['failed']}</td><td>{r['open']}</td>"
                f'<td><div class="bar" title="{pct:.0f}%"><div style="width:{pct:.0f}%"></div></div></td></tr>'
            )
        body.append("</table>")
        return page(request, "Runs and progress", "".join(body), account)

    async def coverage_page(request: Request) -> Response:
        account = await who(request)
        if isinstance(account, Response):
            return account
        raw = request.query_params.get("period") or _quarter_of(runtime.clock())
        try:
            period = reports.parse_period(raw)
        except InputError as exc:
            return page(request, "Coverage", f'<p class="err">{escape(str(exc))}</p>', account)
        report = await run_in_threadpool(reports.coverage, store, period)
        cells = {(c["district"], c["segment"]): c for c in report["cells"]}
        html = [
            f'<form><label>Period <input name="period" value="{escape(report["period"])}"></label>'
            f'<button>Show</button></form><p class="muted">{report["runs"]} runs; percent of eligible residents '
            "(registry, opted-out excluded) reached by a message a carrier took and did not report failed; "
            "hover a cell for delivered, undelivered and unconfirmed (no final report by the deadline).</p>"
            '<table id="heatmap"><tr><th class="l">group</th>'
            + "".join(f"<th>{escape(d.name)}</th>" for d in domain.DISTRICTS)
            + "</tr>"
        ]
        for s in domain.SEGMENTS:
            html.append(f'<tr><th class="l">{escape(s.name)}</th>')
            for d in domain.DISTRICTS:
                c = cells[(d.id, s.id)]
                if not c["eligible"]:
                    # nobody of this group lives there (in the registry): not a coverage gap, so not red
                    html.append(
                        f'<td data-district="{d.id}" data-segment="{s.id}" data-percent="0.0" data-empty="1" style="background:#eceef2" title="no eligible residents">–</td>'
                    )
                    continue
                html.append(
                    f'<td data-district="{d.id}" data-segment="{s.id}" data-percent="{c["percent"]}" '
                    f'style="background:{_heat(c["percent"])}" title="{c["reached"]} of {c["eligible"]} reached, '
                    f'{c["delivered"]} delivered, {c["undelivered"]} undelivered, {c["unconfirmed"]} unconfirmed">'
                    f"{c['percent']}%</td>"
                )
            html.append("</tr>")
        html.append('<tr><th class="l">all residents</th>')
        for d in report["districts"]:
            html.append(
                f'<td data-district="{d["district"]}" data-percent="{d["percent"]}" '
                f'style="background:{_heat(d["percent"])}"><strong>{d["percent"]}%</strong>'
                f' <span class="muted">of {d["eligible"]}</span></td>'
            )
        html.append("</tr></table>")
        return page(request, f"Coverage {report['period']}", "".join(html), account)

    async def rates_page(request: Request) -> Response:
        account = await who(request)
        if isinstance(account, Response):
            return account
        days = await run_in_threadpool(_daily_rates, runtime)
        return page(request, "Delivery rate by day", _rates_svg(days), account)

    async def assessment_page(request: Request) -> Response:
        account = await who(request)
        if isinstance(account, Response):
            return account
        now = _quarter_of(runtime.clock())
        raw_year = (request.query_params.get("year") or now[:4]).strip()
        raw_quarter = (request.query_params.get("quarter") or now[-2:]).strip().upper()
        form = (
            f'<form id="assessment-form"><label>Year <input name="year" value="{escape(raw_year)}" size="6"></label>'
            f' <label>Quarter <input name="quarter" value="{escape(raw_quarter)}" size="3"></label>'
            "<button>Show</button></form>"
        )
        try:
            year = reports.parse_year(raw_year)
            if raw_quarter not in QUARTERS:
                raise InputError(f"quarter: expected Q1, Q2, Q3 or Q4, got {raw_quarter!r}", field="quarter")
            targets = load_targets(runtime.settings.targets_path)
        except InputError as exc:
            return page(request, "Assessment", form + f'<p class="err">{escape(str(exc))}</p>', account)
        report = await run_in_threadpool(reports.assessment, store, year, targets, runtime.settings.part_prices)
        rows = [r for r in report["rows"] if r["quarter"].endswith(raw_quarter)]
        return page(request, f"Assessment {year}{raw_quarter}", form + _assessment_html(report, rows), account)

    async def ledger_page(request: Request) -> Response:
        account = await who(request)
        if isinstance(account, Response):
            return account
        q = request.query_params
        # searching by exact number tells whether that number was messaged: trying the candidates a
        # masked number leaves recovers it, so only operators may, and each search is on record
        fields: tuple[str, ...] = (
            "campaign", "run", "district", "segment", "state", "error_code", "phone", "since", "until",
        )  # fmt: skip
        if not account.may_unmask:
            fields = tuple(k for k in fields if k != "phone")
            if q.get("phone"):
                return page(request, "Ledger search", '<p class="err">Only operators may search by phone number.</p>',
                            account, status=403)  # fmt: skip
        raw = {k: q.get(k) for k in fields}
        unmask = account.may_unmask and q.get("unmask") == "1"
        form = ['<form class="search" id="ledger-search">']
        for k in fields:
            form.append(f'<label>{k} <input name="{k}" value="{escape(raw[k] or "")}" size="12"></label>')
        if account.may_unmask:
            form.append(f'<label><input type="checkbox" name="unmask" value="1"{" checked" if unmask else ""}>'
                        " unmask (recorded in the ledger)</label>")  # fmt: skip
        form.append("<button>Search</button></form>")
        if not any(raw.values()):
            return page(
                request, "Ledger search", "".join(form) + '<p class="muted">Give at least one filter.</p>', account
            )
        try:
            f = audit.LogFilter.parse(**raw)
        except InputError as exc:
            return page(request, "Ledger search", "".join(form) + f'<p class="err">{escape(str(exc))}</p>', account)

        def search() -> list[dict[str, Any]]:
            audit.record_access(store, actor=f"web:{account.name}", f=f, unmask=unmask, fmt="html", via="dashboard")
            return list(audit.iter_log(store, f, unmask=unmask, limit=200))

        rows = await run_in_threadpool(search)
        cols = ("at", "run_id", "phone", "district", "from_state", "to_state", "gateway", "provider_id",
                "error_code", "actor")  # fmt: skip
        table = ['<table id="ledger"><tr>' + "".join(f'<th class="l">{c}</th>' for c in cols)
                 + ('<th class="l">trace</th>' if account.may_unmask else "") + "</tr>"]  # fmt: skip
        for row in rows:
            # operators open the person's delivery page (attempts and HTTP exchanges) from the event
            link = (
                f'<td class="l"><a href="/dashboard/delivery?run={quote(str(row["run_id"]))}&amp;event={row["event_id"]}'
                f'&amp;delivery={row["delivery_id"]}">'
                "attempts</a></td>"
                if account.may_unmask
                else ""
            )
            table.append(
                "<tr>" + "".join(f'<td class="l">{escape(str(row[c] or ""))}</td>' for c in cols) + link + "</tr>"
            )
        table.append(f'</table><p class="muted">{len(rows)} events (at most 200; use `dispatch audit log` for all)</p>')
        return page(request, "Ledger search", "".join(form) + "".join(table), account)

    async def delivery_page(request: Request) -> Response:
        account = await who(request)
        if isinstance(account, Response):
            return account
        title = "Delivery traces"
        # a trace is what was said to a provider about one person, found by their number: operators only
        if not account.may_unmask:
            return page(request, title, '<p class="err">Only operators may read delivery traces.</p>', account,
                        status=403)  # fmt: skip
        q = request.query_params
        run_id, phone, event = (q.get("run") or "").strip(), (q.get("phone") or "").strip(), q.get("event") or ""
        form = (
            '<form class="search" id="delivery-search"><label>run <input name="run" value="'
            f'{escape(run_id)}" size="24"></label><label>phone <input name="phone" size="16"></label>'
            "<button>Show</button></form>"
            '<p class="muted">Every view is recorded in the audit chain.</p>'
        )
        if not run_id or not (phone or event):
            return page(request, title, form + '<p class="muted">Give a run and a phone number.</p>', account)
        try:
            event_id = int(event) if event and not phone else None
            # an event about a whole batch names many deliveries: the link says which one
            delivery_id = int(q["delivery"]) if event_id is not None and q.get("delivery") else None
            phone = traces.parse_phone(phone) if phone else ""
        except ValueError:
            return page(request, title, form + '<p class="err">event: expected an event id</p>', account, 400)
        except InputError as exc:
            return page(request, title, form + f'<p class="err">{escape(str(exc))}</p>', account, 400)

        def look() -> dict[str, Any]:
            return traces.delivery_trace(
                store, run_id, phone=phone or None, event_id=event_id, delivery_id=delivery_id,
                actor=f"web:{account.name}", via="dashboard",
            )  # fmt: skip

        try:
            found = await run_in_threadpool(look)
        except InputError as exc:
            return page(request, title, form + f'<p class="err">{escape(str(exc))}</p>', account, 404)
        return page(request, f"Delivery {found['phone']} in run {found['run_id']}", form + _delivery_html(found),
                    account)  # fmt: skip

    # ---------------------------------------------------------- early-warning alerts (operators only)

    def alerts_html(message: str = "") -> str:
        rows = [
            '<table id="alerts"><tr><th class="l">alert</th><th class="l">created</th><th class="l">fraud type</th>'
            '<th class="l">resident</th><th class="l">district</th><th class="l">grid</th><th>first contact</th>'
            '<th>confirmed</th><th class="l">close</th></tr>'
        ]
        options = "".join(f'<option value="{o}">{o}</option>' for o in alerting.OUTCOMES)
        for a in store.alerts.recent(open_only=True):
            j = alerting.alert_json(a)
            rows.append(
                f'<tr><td class="l">{escape(a.id)}</td><td class="l">{escape(j["created_at"] or "")}</td>'
                f'<td class="l">{escape(j["fraud_name"])}</td><td class="l">{escape(j["phone"])}</td>'
                f'<td class="l">{escape(a.district or "-")}</td><td class="l">{escape(a.grid or "-")}</td>'
                f"<td>{escape(j['first_contact_at'] or '-')}</td><td>{escape(j['confirmed_at'] or '-')}</td>"
                f'<td class="l"><form method="post" action="/dashboard/alerts/{escape(a.id)}/close">'
                f'<input type="hidden" name="csrf" value="{_CSRF_SLOT}"><select name="outcome">{options}</select> '
                '<input name="note" placeholder="note" maxlength="1000"> <button>Close</button></form></td></tr>'
            )
        rows.append("</table>")
        return (f'<p class="err" role="alert">{escape(message)}</p>' if message else "") + "".join(rows)

    async def alerts_page(request: Request) -> Response:
        account = await who(request)
        if isinstance(account, Response):
            return account
        if account.role != "operator":
            return page(request, "Open alerts", '<p class="err">Only operators handle alerts.</p>', account, 403)
        return page(request, "Open alerts", await run_in_threadpool(alerts_html), account)

    async def close_alert(request: Request) -> Response:
        account = await who(request)
        if isinstance(account, Response):
            return account
        form = await read_form(request)
        if forged(request, form):
            return Response("cross-site request refused", status_code=403)
        if account.role != "operator":
            return page(request, "Open alerts", '<p class="err">Only operators handle alerts.</p>', account, 403)
        alert_id = request.path_params["alert_id"]
        try:
            await run_in_threadpool(
                alerting.close_alert, runtime, alert_id, form.get("outcome", ""), form.get("note") or None,
                account.name,
            )  # fmt: skip
        except InputError as exc:
            body = await run_in_threadpool(alerts_html, str(exc))
            return page(request, "Open alerts", body, account, 400)
        return RedirectResponse("/dashboard/alerts", status_code=303)

    # ---------------------------------------------------------- approvals

    def campaigns() -> list[LoadedCampaign]:
        settings = runtime.settings
        loaded, _errors = check_paths(
            [settings.campaigns_dir], settings.templates_dir, runtime.clock(), gateways=runtime.known_gateways()
        )
        return sorted(loaded, key=lambda lc: lc.campaign.id)

    def approval_rows(account: accounts.Account) -> str:
        rows = ['<table id="approvals"><tr><th class="l">campaign</th><th class="l">version</th>'
                '<th class="l">state</th><th class="l"></th></tr>']  # fmt: skip
        for lc in campaigns():
            version, state = approvals.current(runtime, lc, actor=f"web:{account.name}")
            action = ""
            row = state.current
            if row is not None and not row.approved_by and account.role == "operator":
                if row.submitted_by == account.name:
                    action = '<span class="muted">yours: a second operator approves it</span>'
                else:
                    action = (
                        '<form method="post" action="/dashboard/approvals">'
                        f'<input type="hidden" name="csrf" value="{_CSRF_SLOT}">'
                        f'<input type="hidden" name="campaign" value="{escape(lc.campaign.id)}">'
                        f'<input type="hidden" name="version" value="{escape(version)}">'
                        "<button>Approve</button></form>"
                    )
            rows.append(
                f'<tr><td class="l">{escape(lc.campaign.id)}</td><td class="l"><code>{approvals.short(version)}</code></td>'
                f'<td class="l">{escape(approvals.describe(state))}</td><td class="l">{action}</td></tr>'
            )
        rows.append("</table>")
        return "".join(rows)

    async def approvals_page(request: Request) -> Response:
        account = await who(request)
        if isinstance(account, Response):
            return account
        body = await run_in_threadpool(approval_rows, account)
        return page(request, "Campaign approvals", body, account)

    async def approve(request: Request) -> Response:
        """An operator approves a version another operator submitted (the version shown, or nothing)."""
        account = await who(request)
        if isinstance(account, Response):
            return account
        form = await read_form(request)
        if forged(request, form):
            return Response("cross-site request refused", status_code=403)
        if account.role != "operator":
            return Response("only operators approve campaigns", status_code=403)

        def act() -> str:
            found = next((lc for lc in campaigns() if lc.campaign.id == form.get("campaign")), None)
            if found is None:
                return f"no valid campaign {form.get('campaign', '')!r} under {runtime.settings.campaigns_dir}"
            try:
                approvals.approve(runtime, found, by=account.name, expected=form.get("version") or "-")
            except InputError as exc:
                return exc.message
            return ""

        problem = await run_in_threadpool(act)
        if problem:
            body = f'<p class="err" role="alert">{escape(problem)}</p>' + await run_in_threadpool(approval_rows, account)
            return page(request, "Campaign approvals", body, account, 409)
        return RedirectResponse("/dashboard/approvals", status_code=303)

    return [
        Route("/dashboard/alerts", alerts_page),
        Route("/dashboard/alerts/{alert_id}/close", close_alert, methods=["POST"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/dashboard", runs_page),
        Route("/dashboard/coverage", coverage_page),
        Route("/dashboard/rates", rates_page),
        Route("/dashboard/assessment", assessment_page),
        Route("/dashboard/ledger", ledger_page),
        Route("/dashboard/delivery", delivery_page),
        Route("/dashboard/approvals", approvals_page, methods=["GET"]),
        Route("/dashboard/approvals", approve, methods=["POST"]),
    ]


def _assessment_html(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """One quarter's scores: a bar per department and town (coverage, the target as a tick), then the table."""
    in_force = report["targets_year"]
    note = (
        f'<p class="muted">{report["runs"]} runs in {report["year"]}; targets from {escape(report["targets"])}'
        + (f" (those of {in_force})" if in_force not in (None, report["year"]) else "")
        + ". Coverage: residents it answers for (a department: its groups; a town: its district; opted-out "
        "excluded) with a message sent or delivered in the quarter. Pushes: runs that reached them.</p>"
    )
    if not rows:
        return note
    label_w, bar_w, row_h = 150, 360, 22
    height = row_h * len(rows) + 30
    svg = [f'<svg id="assessment-chart" xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 170}" '
           f'height="{height}" role="img" aria-label="coverage against target">']  # fmt: skip
    for pct in (0, 50, 100):
        x = label_w + bar_w * pct / 100
        svg.append(f'<line x1="{x:.0f}" x2="{x:.0f}" y1="0" y2="{height - 20}" stroke="#ccd"/>'
                   f'<text x="{x - 8:.0f}" y="{height - 6}" font-size="10">{pct}%</text>')  # fmt: skip
    for i, r in enumerate(rows):
        y = i * row_h + 4
        pct = 100 * r["coverage"]
        colour = {True: "#2a9d8f", False: "#e76f51", None: "#9aa3b1"}[r["met"]]
        verdict = {True: "met", False: "not met", None: "no target"}[r["met"]]
        svg.append(
            f'<text x="4" y="{y + 13}" font-size="12">{escape(r["name"])}</text>'
            f'<rect x="{label_w}" y="{y}" width="{bar_w * pct / 100:.1f}" height="{row_h - 6}" fill="{colour}" '
            f'data-unit="{r["unit"]}" data-coverage="{r["coverage"]}" data-met="{verdict}">'
            f"<title>{escape(r['name'])}: {pct:.1f}% of {r['eligible']}, {r['pushes']} push(es); {verdict}</title></rect>"
        )
        if r["target_coverage"] is not None:
            tx = label_w + bar_w * r["target_coverage"]
            svg.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{y - 2}" y2="{y + row_h - 4}" stroke="#1d2330" '
                       'stroke-width="2"/>')  # fmt: skip
        svg.append(f'<text x="{label_w + bar_w + 6}" y="{y + 13}" font-size="11">{pct:.1f}% · {verdict}</text>')
    svg.append("</svg>")

    def names(shortfall: dict[str, int]) -> str:
        found = (domain.segment(k) or domain.district(k) for k in shortfall)
        return ", ".join(f"{escape(f.name if f else k)} {n}" for f, (k, n) in zip(found, shortfall.items(), strict=True))

    table = ['<table id="assessment"><tr><th class="l">department / town</th><th>eligible</th><th>reached</th>'
             "<th>coverage</th><th>target</th><th>pushes</th><th>target</th><th>met</th><th>shortfall</th>"
             '<th class="l">by group</th><th class="l">by district</th><th>spend CNY</th></tr>']  # fmt: skip
    for r in rows:
        verdict = {True: "met", False: "not met", None: "no target"}[r["met"]]
        target = "" if r["target_coverage"] is None else f"{100 * r['target_coverage']:.0f}%"
        table.append(
            f'<tr data-unit="{r["unit"]}"><td class="l">{escape(r["name"])}</td><td>{r["eligible"]}</td>'
            f"<td>{r['reached']}</td><td>{100 * r['coverage']:.1f}%</td><td>{target}</td><td>{r['pushes']}</td>"
            f"<td>{'' if r['target_pushes'] is None else r['target_pushes']}</td>"
            f'<td class="{"err" if r["met"] is False else ""}">{verdict}</td><td>{r["shortfall"] or ""}</td>'
            f'<td class="l">{names(r["shortfall_by_group"])}</td><td class="l">{names(r["shortfall_by_district"])}</td>'
            f"<td>{r['spend_cny']:.2f}</td></tr>"
        )
    table.append("</table>")
    spend = [s for s in report["spend"] if rows and s["quarter"] == rows[0]["quarter"]]
    if spend:
        table.append('<h2>Spend by owning department</h2><table id="spend"><tr><th class="l">owner</th>'
                     "<th>parts</th><th>CNY</th></tr>")  # fmt: skip
        table.extend(
            f'<tr><td class="l">{escape(s["name"])}</td><td>{s["parts"]}</td><td>{s["spend_cny"]:.2f}</td></tr>'
            for s in spend
        )
        table.append("</table>")
    return note + "".join(svg) + "".join(table)


def _delivery_html(d: dict[str, Any]) -> str:
    """One person's delivery: summary, every attempt with its state change and exchanges, the state history."""

    def cell(value: Any) -> str:
        return escape("" if value is None else str(value))

    def local(iso: str | None) -> str:
        return datetime.fromisoformat(iso).astimezone(audit.LOCAL_TZ).strftime("%Y-%m-%d %H:%M:%S") if iso else ""

    def body(value: Any) -> str:
        if value is None:
            return ""
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=1, sort_keys=True)
        return f"<pre>{escape(text)}</pre>"

    html = [
        '<table id="delivery"><tr><th class="l">phone</th><th class="l">state</th><th class="l">gateway</th>'
        '<th class="l">provider id</th><th class="l">error</th></tr>'
        f'<tr><td class="l">{cell(d["phone"])}</td><td class="l">{cell(d["state"])}</td>'
        f'<td class="l">{cell(d["gateway"])}</td><td class="l">{cell(d["provider_id"])}</td>'
        f'<td class="l">{cell(d["error_code"])}</td></tr></table>'
    ]
    if not d["attempts"]:
        html.append('<p class="muted">No attempts: nothing was handed to a gateway for this person.</p>')
    for a in d["attempts"]:
        html.append(
            f'<section class="attempt" data-attempt="{a["attempt"]}" data-trace="{a["trace"]}">'
            f"<h2>Attempt {a['attempt']} · {local(a['at'])} (Asia/Shanghai) · {cell(a['gateway'])}</h2>"
            f"<p>{cell(a['from_state'] or '?')} → {cell(a['to_state'] or '?')} · outcome {cell(a['outcome'])}"
            f" · error {cell(a['error_code'] or '-')} {cell(a['error_message'] or '')}</p>"
        )
        if a["trace"] == traces.PURGED:
            html.append(f'<p class="muted">Trace purged at {local(a["trace_purged_at"])} (retention).</p>')
        elif a["trace"] == traces.NONE:
            html.append('<p class="muted">No HTTP exchange recorded.</p>')
        for x in a["exchanges"]:
            if "raw" in x:
                html.append(body(x["raw"]))
                continue
            result = x.get("status") if x.get("status") is not None else x.get("error", "no answer")
            html.append(
                f'<div class="exchange"><p><strong>{cell(x.get("method"))}</strong> {cell(x.get("url"))} → '
                f"{cell(result)} in {cell(x.get('elapsed_ms'))} ms</p>"
                + "".join(
                    f'<p class="muted">{label}</p>{body(x.get(name))}'
                    for name, label in (
                        ("request_headers", "request headers"),
                        ("request", "request body"),
                        ("response", "response body"),
                    )
                    if x.get(name) is not None
                )
                + "</div>"
            )
        html.append("</section>")
    html.append('<h2>State history (ledger)</h2><table id="history"><tr><th class="l">time</th><th class="l">change</th>'
                '<th class="l">error</th><th class="l">reason</th><th class="l">by</th></tr>')  # fmt: skip
    for e in d["events"]:
        html.append(
            f'<tr><td class="l">{local(e["at"])}</td><td class="l">{cell(e["from_state"] or "-")} → '
            f'{cell(e["to_state"] or "-")}</td><td class="l">{cell(e["error_code"])}</td>'
            f'<td class="l">{cell(e["reason"])}</td><td class="l">{cell(e["actor"])}</td></tr>'
        )
    html.append("</table>")
    return "".join(html)


def _safe_next(value: str | None) -> str:
    """Only paths inside the dashboard: a login must not become an open redirect."""
    return value if value and value.startswith("/dashboard") and "//" not in value else "/dashboard"


def _quarter_of(now: datetime) -> str:
    local = now.astimezone(audit.LOCAL_TZ)
    return f"{local.year}Q{(local.month - 1) // 3 + 1}"


def _counts_by_run(runtime: Runtime, run_ids: list[str]) -> dict[str, dict[str, int]]:
    return runtime.store.dashboard.counts_by_run(run_ids)


def _runs_with_progress(runtime: Runtime) -> list[dict[str, Any]]:
    runs = runtime.store.list_runs(limit=50)
    counts = _counts_by_run(runtime, [r.id for r in runs])
    out = []
    for r in runs:
        c = counts.get(r.id, {})
        total = sum(c.values())
        dep = domain.department(r.owner)
        out.append({
            **r.as_dict(), "owner_name": dep.name if dep else r.owner, "total": total,
            # sent: handed over (whatever the report); the next three say what the carriers reported
            "sent": sum(c.get(s, 0) for s in HANDED_OVER_STATES), "delivered": c.get(DELIVERED, 0),
            "undelivered": c.get(UNDELIVERED, 0), "unconfirmed": c.get(UNCONFIRMED, 0),
            "failed": sum(c.get(s, 0) for s in FAILED_STATES),
            "open": sum(c.get(s, 0) for s in OPEN_STATES), "done": total - sum(c.get(s, 0) for s in OPEN_STATES),
        })  # fmt: skip
    return out


def _daily_rates(runtime: Runtime, limit: int = 500) -> list[dict[str, Any]]:
    """Per local day of the runs' fire/creation time: messages attempted and the share sent or delivered."""
    runs = runtime.store.list_runs(limit=limit)
    counts = _counts_by_run(runtime, [r.id for r in runs])
    days: dict[str, dict[str, int]] = defaultdict(lambda: {"attempted": 0, "reached": 0, "delivered": 0})
    for r in runs:
        when = (r.fire_time or r.created_at).astimezone(audit.LOCAL_TZ).date().isoformat()
        c = counts.get(r.id, {})
        day = days[when]
        day["attempted"] += sum(n for s, n in c.items() if s not in ("skipped", "cancelled", "pending"))
        day["reached"] += sum(c.get(s, 0) for s in REACHED_STATES)
        day["delivered"] += c.get("delivered", 0)
    return [
        {"day": k, **v, "rate": round(100.0 * v["reached"] / v["attempted"], 1) if v["attempted"] else 0.0}
        for k, v in sorted(days.items())
    ]


def _rates_svg(days: list[dict[str, Any]]) -> str:
    if not days:
        return '<p class="muted">No runs yet.</p>'
    width, height, pad = max(320, 40 * len(days) + 60), 240, 40
    bar = (width - pad - 20) / len(days)
    parts = [f'<svg id="rates" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 60}" '
             'role="img" aria-label="delivery rate by day">']  # fmt: skip
    for pct in (0, 50, 100):
        y = pad + height - height * pct / 100 - pad
        parts.append(f'<line x1="{pad}" x2="{width - 10}" y1="{y:.0f}" y2="{y:.0f}" stroke="#ccd"/>'
                     f'<text x="4" y="{y + 4:.0f}" font-size="11">{pct}%</text>')  # fmt: skip
    for i, d in enumerate(days):
        h = (height - pad) * d["rate"] / 100
        x = pad + i * bar + 4
        y = height - h
        parts.append(
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{max(bar - 8, 4):.0f}" height="{h:.0f}" fill="{_heat(d["rate"])}" '
            f'stroke="#2a9d8f" data-day="{d["day"]}" data-rate="{d["rate"]}"><title>{d["day"]}: {d["rate"]}% of '
            f"{d['attempted']} ({d['delivered']} delivered)</title></rect>"
            f'<text x="{x:.0f}" y="{height + 16}" font-size="10">{d["day"][5:]}</text>'
            f'<text x="{x:.0f}" y="{y - 4:.0f}" font-size="10">{d["rate"]}%</text>'
        )
    parts.append("</svg>")
    table = "".join(
        f"<tr><td class='l'>{d['day']}</td><td>{d['attempted']}</td><td>{d['reached']}</td><td>{d['delivered']}</td>"
        f"<td>{d['rate']}%</td></tr>"
        for d in days
    )
    return ("".join(parts) + "<table><tr><th class='l'>day</th><th>attempted</th><th>sent or delivered</th>"
            f"<th>delivered</th><th>rate</th></tr>{table}</table>")  # fmt: skip
