"""The Kannel adapter against a real Kannel: Debian's bearerbox and smsbox, with ``fakesmsc`` as the SMSC.

bearerbox runs a ``smsc = fake`` connection that ``fakesmsc`` (kannel-extras) connects
to: every message Kannel submits is printed by fakesmsc, and Kannel's fake SMSC
reports it delivered, so smsbox calls the DLR URL of each send with type 8 (submitted
to the SMSC) and then 1 (delivered). Those calls go to a real ``dispatch web``; no
report in these tests is made by hand.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import httpx
import pytest
import sqlalchemy as sa

from dispatcher.errors import GatewayDown, PermanentSendError
from dispatcher.providers.base import OutgoingMessage
from dispatcher.providers.kannel.gateway import KannelGateway
from tests.conftest import Project, missing_service, serve_web, stop_processes, wait_for

pytestmark = pytest.mark.slow

BEARERBOX = shutil.which("bearerbox") or "/usr/sbin/bearerbox"
SMSBOX = shutil.which("smsbox") or "/usr/sbin/smsbox"
FAKESMSC = "/usr/lib/kannel/test/fakesmsc"
USERNAME = "dispatch"
PASSWORD = "kannel-sendsms-7f3e91"
DLR_SECRET = "dlr-secret-" + "c0ffee" * 4
ADMIN_PASSWORD = "kannel-admin-41d2"
SENDER = "96110"
TEMPLATE = "【常州经开区反诈中心】{{ recipient.name }}您好，请警惕冒充客服退款诈骗，核实请拨96110。"
CAMPAIGN = "id: kannel-e2e\ntitle: 统一提醒\nowner: 公安分局\ntemplate: kannel.sms.j2\naudience:\n  districts: all\n"
def smsc_bytes(data: str) -> bytes:
    """The bytes of fakesmsc's data field: Kannel URL-encodes it with a space (0x20) as '+', so a
    UTF-16 character whose low byte is 0x20 (张 is 5F 20) would otherwise come back as 弫 (5F 2B)."""
    return unquote_to_bytes(data.replace("+", "%20"))


#: what fakesmsc prints for each message bearerbox submits to it: <sender receiver coding data>
GOT_MESSAGE = re.compile(r"Got message \d+: <(\S+) (\S+) (\S+) (\S*)>")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Kannel:
    sendsms_url: str
    admin_url: str
    folder: Path

    def submitted(self) -> list[tuple[str, str, str, str]]:
        """(sender, receiver, coding, data) of every message the fake SMSC received so far."""
        return [m.groups() for m in GOT_MESSAGE.finditer((self.folder / "fakesmsc.log").read_text(errors="replace"))]


def kannel_conf(folder: Path, admin: int, boxes: int, smsc: int, sendsms: int) -> str:
    return f"""\
group = core
admin-port = {admin}
admin-password = {ADMIN_PASSWORD}
admin-allow-ip = "127.0.0.1"
smsbox-port = {boxes}
box-allow-ip = "127.0.0.1"
dlr-storage = internal
log-file = "{folder / "bearerbox.log"}"
log-level = 1

group = smsc
smsc = fake
smsc-id = fake
port = {smsc}
connect-allow-ip = "127.0.0.1"

group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {boxes}
sendsms-port = {sendsms}
sendsms-interface = 127.0.0.1
log-file = "{folder / "smsbox.log"}"
log-level = 1

group = sendsms-user
username = {USERNAME}
password = {PASSWORD}
max-messages = 3
concatenation = true
"""


@pytest.fixture(scope="module")
def kannel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kannel]:
    """bearerbox, fakesmsc and smsbox on free 127.0.0.1 ports, as this user (Kannel drops no privileges
    unless told to with ``--user``); stopped after the module."""
    missing = [p for p in (BEARERBOX, SMSBOX, FAKESMSC) if not os.access(p, os.X_OK)]
    if missing:
        missing_service(f"Kannel is not installed ({', '.join(missing)}): apt-get install kannel kannel-extras")
    folder = tmp_path_factory.mktemp("kannel")
    admin, boxes, smsc, sendsms = (free_port() for _ in range(4))
    conf = folder / "kannel.conf"
    conf.write_text(kannel_conf(folder, admin, boxes, smsc, sendsms))
    admin_url = f"http://127.0.0.1:{admin}"
    procs: list[subprocess.Popen[str]] = []

    def start(name: str, *argv: str) -> None:
        with (folder / f"{name}.log").open("a") as out:
            procs.append(subprocess.Popen(argv, cwd=folder, stdout=out, stderr=out, text=True))

    def status() -> str:
        try:
            return httpx.get(f"{admin_url}/status.txt", params={"password": ADMIN_PASSWORD}, timeout=1).text
        except httpx.HTTPError:
            return ""

    try:
        start("bearerbox.out", BEARERBOX, str(conf))
        wait_for(lambda: "Status: running" in status(), 15, "bearerbox's admin port")
        # -m 0: fakesmsc makes up no incoming messages, it only takes (and prints) what Kannel submits
        start("fakesmsc", FAKESMSC, "-H", "127.0.0.1", "-r", str(smsc), "-m", "0", "1 2 text unused")
        wait_for(lambda: "(online" in status(), 15, "fakesmsc connected to bearerbox")
        start("smsbox.out", SMSBOX, str(conf))
        wait_for(lambda: "smsbox:" in status().split("Box connections:")[-1], 15, "smsbox connected to bearerbox")
        yield Kannel(f"http://127.0.0.1:{sendsms}/cgi-bin/sendsms", admin_url, folder)
    finally:
        stop_processes(reversed(procs), timeout=10)


def sms(to: str, body: str = "请警惕冒充客服退款诈骗", encoding: str = "UCS-2") -> OutgoingMessage:
    return OutgoingMessage(key=f"r1:{to}", run_id="r1", campaign_id="c", to=to, body=body, parts=1, encoding=encoding)


def gateway(url: str, password: str = PASSWORD) -> KannelGateway:
    return KannelGateway(
        sendsms_url=url,
        username=USERNAME,
        password=password,
        dlr_secret=DLR_SECRET,
        sender=SENDER,
        public_url="http://127.0.0.1:9",
        timeout=5,
    )


def test_smsbox_takes_a_ucs2_message_and_refuses_bad_credentials_for_good(kannel: Kannel) -> None:
    good = gateway(kannel.sendsms_url)
    try:
        result = good.send(sms("+8613900139001"))
    finally:
        good.close()
    assert result.provider_id == "kannel:r1:+8613900139001" and result.status == "queued"
    wait_for(lambda: any(r == "+8613900139001" for _, r, _, _ in kannel.submitted()), 10, "the fake SMSC got it")
    sender, _, coding, data = next(m for m in kannel.submitted() if m[1] == "+8613900139001")
    # coding=2 made smsbox send UCS-2: the Chinese text arrives whole, not as question marks
    assert (sender, coding) == (SENDER, "ucs-2")
    assert smsc_bytes(data).decode("utf-16-be") == "请警惕冒充客服退款诈骗"

    bad = gateway(kannel.sendsms_url, password="not-the-password")
    try:
        with pytest.raises(PermanentSendError) as refused:
            bad.send(sms("+8613900139002"))
    finally:
        bad.close()
    assert refused.value.code == "kannel.auth" and not refused.value.retryable
    assert "not-the-password" not in repr(refused.value.trace)


def test_a_refused_connection_stops_the_batch_keeping_what_smsbox_took_before(kannel: Kannel) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = int(s.getsockname()[1])  # nothing listens here once the socket is closed
    down = gateway(f"http://127.0.0.1:{closed}/cgi-bin/sendsms")
    try:
        with pytest.raises(GatewayDown) as caught:
            down.send_many([sms("+8613900139003"), sms("+8613900139004")])
    finally:
        down.close()
    assert caught.value.done == []


def test_a_campaign_through_kannel_is_delivered_by_kannels_own_reports(
    kannel: Kannel, project: Project, tmp_path: Path
) -> None:
    project.registry(size=40, seed=5)
    project.write("templates/kannel.sms.j2", TEMPLATE)
    project.write("campaigns/kannel-e2e.yaml", CAMPAIGN)
    project.approve("campaigns/kannel-e2e.yaml")  # Kannel is a real gateway: approved versions only
    kannel_env = {
        "DISPATCH_GATEWAY": "kannel",
        "DISPATCH_KANNEL_URL": kannel.sendsms_url,
        "DISPATCH_KANNEL_USERNAME": USERNAME,
        "DISPATCH_KANNEL_PASSWORD": PASSWORD,
        "DISPATCH_KANNEL_FROM": SENDER,
        "DISPATCH_KANNEL_DLR_SECRET": DLR_SECRET,
    }
    project.env.update(kannel_env)
    before = len(kannel.submitted())
    web_log = tmp_path / "web.log"
    # the web process keeps the project's clock (not serve_web's fixed date), so DLR lag is real time
    with serve_web(project, web_log, DISPATCH_FAKE_NOW="") as (base, _web):
        project.env["DISPATCH_PUBLIC_URL"] = base
        ran = project.dispatch("run", "campaigns/kannel-e2e.yaml", "--json", timeout=60)
        assert ran.returncode == 0, ran.stderr
        run_id = json.loads(ran.stdout)["run_id"]
        rt = project.runtime()

        def rows() -> list[dict[str, Any]]:
            return [r for r in rt.store.deliveries(run_id) if r.provider_id]

        sent = rows()
        assert len(sent) >= 20 and all(r.gateway == "kannel" for r in sent)
        wait_for(lambda: all(r.state == "delivered" for r in rows()), 30, "Kannel's delivery reports")
    delivered = rows()

    # every recipient reached the SMSC exactly once, with the text rendered for them
    submitted = kannel.submitted()[before:]
    assert Counter(receiver for _, receiver, _, _ in submitted) == Counter(r.phone for r in delivered)
    bodies = {receiver: smsc_bytes(data).decode("utf-16-be") for _, receiver, _, data in submitted}
    assert all(bodies[r.phone] == r.body for r in delivered)

    # one ledger event per change: sent -> delivered once per row, however many reports Kannel made
    engine = sa.create_engine(project.env["DISPATCH_DATABASE_URL"])
    with engine.connect() as conn:
        moves = conn.execute(
            sa.text(
                "SELECT key, actor FROM events WHERE run_id = :r AND kind = 'delivery.state' AND to_state = 'delivered'"
            ),
            {"r": run_id},
        ).all()
    engine.dispose()
    assert sorted(k for k, _ in moves) == sorted(r.key for r in delivered)
    assert {a for _, a in moves} == {"kannel"}
    verified = project.dispatch("audit", "verify")
    assert verified.returncode == 0 and f"ok {run_id}" in verified.stdout, verified.stdout + verified.stderr

    # the web log saw every report, masked: no full number, no credential, no DLR token
    logged = web_log.read_text()
    assert logged.count('"final": false') >= len(delivered)  # type 8, submitted to the SMSC
    assert not any(r.phone in logged or r.phone[3:] in logged for r in delivered)
    assert PASSWORD not in logged and DLR_SECRET not in logged

    lags = [(r.updated_at - r.sent_at).total_seconds() for r in delivered]
    print(
        f"\nKannel DLR lag (sent_at -> delivered) over {len(lags)} messages: "
        f"median {statistics.median(lags) * 1000:.0f} ms, max {max(lags) * 1000:.0f} ms"
    )
