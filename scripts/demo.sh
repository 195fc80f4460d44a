#!/usr/bin/env bash
# End-to-end demo on the embedded defaults: synthetic registry -> validate -> preview -> approval -> run -> check.
# It uses the same delivery log and outbox as every later `dispatch` command in this folder
# (var/dispatch.db, var/outbox.jsonl), so the README's next steps see the demo's run.
set -euo pipefail
CAMPAIGN=campaigns/quarterly-themes.yaml
unset DISPATCH_DATABASE_URL DISPATCH_OUTBOX_PATH DISPATCH_BROKER_URL DISPATCH_GATEWAY || true

# a demo starts afresh; what an earlier demo (or a local drill) left is kept aside, not deleted
if [ -e var/dispatch.db ] || [ -e var/outbox.jsonl ]; then
  keep="var/previous/$(date +%Y%m%d-%H%M%S)"
  mkdir -p "$keep"
  for f in var/dispatch.db var/dispatch.db-wal var/dispatch.db-shm var/outbox.jsonl; do
    if [ -e "$f" ]; then mv "$f" "$keep/"; fi
  done
  echo "== the previous delivery log and outbox were moved to $keep"
fi
mkdir -p var

# Bulk SMS may only go out 08:00-21:00 Asia/Shanghai. Outside those hours a real run waits for 08:00;
# the demo instead moves its clock to 10:00 Shanghai time so that it finishes whenever it is run.
HOUR=$(python -c 'import datetime, zoneinfo; print(datetime.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")).hour)')
if [ "$HOUR" -lt 8 ] || [ "$HOUR" -ge 21 ]; then
  export DISPATCH_FAKE_NOW="$(python -c 'import datetime, zoneinfo; t=datetime.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")); print(t.replace(hour=10, minute=0, second=0, microsecond=0).isoformat())')"
  echo "== it is ${HOUR}h in Shanghai, outside the 08:00-21:00 bulk window: the demo's clock reads $DISPATCH_FAKE_NOW"
fi

echo "== 1. a synthetic registry of 20,000 residents over the six towns and streets"
dispatch audience generate --size 20000 --seed 2021 --output var/residents.csv
dispatch audience import var/residents.csv
dispatch audience stats

echo "== 2. validate every campaign and organisation.yaml; the 2021-2023 plan's themes, one per quarter of each year"
dispatch validate
dispatch schedule list --from 2021-01-01 --until 2024-01-01 --count 12 --campaigns campaigns/plan-2021-2023-themes.yaml

echo "== 3. preview $CAMPAIGN (sends nothing)"
dispatch preview "$CAMPAIGN"

echo "== 4. two-person approval: one operator submits the campaign's version, a second approves it"
# two demo operators with random passwords given on standard input (never on the command line); the
# passwords are not kept, and the accounts are disabled again once they have approved
AUTHOR_PW=$(python -c 'import secrets; print(secrets.token_urlsafe(18))')
APPROVER_PW=$(python -c 'import secrets; print(secrets.token_urlsafe(18))')
printf '%s\n' "$AUTHOR_PW" | dispatch users add demo-author --role operator --replace
printf '%s\n' "$APPROVER_PW" | dispatch users add demo-approver --role operator --replace
printf '%s\n' "$AUTHOR_PW" | dispatch submit "$CAMPAIGN" --as demo-author
if printf '%s\n' "$AUTHOR_PW" | dispatch approve "$CAMPAIGN" --as demo-author; then
  echo "the author approved their own version: that must never happen" >&2; exit 1
fi
echo "   (refused as it should be: the author cannot approve their own version)"
printf '%s\n' "$APPROVER_PW" | dispatch approve "$CAMPAIGN" --as demo-approver
dispatch users disable demo-author
dispatch users disable demo-approver
dispatch approvals
echo "   Twilio, a carrier's HTTP API or Kannel send only an approved version; this demo runs on the outbox"
echo "   drill gateway, which is exempt (the run records 'drill: outbox gateway'), so it would run unapproved too."
unset AUTHOR_PW APPROVER_PW

echo "== 5. run it on the embedded broker and the outbox gateway"
RUN=$(dispatch run "$CAMPAIGN")

echo "== 5b. the plan's campaign is over: a dry run as of a quarter of the plan renders that quarter's theme"
dispatch run campaigns/plan-2021-2023-themes.yaml --dry-run --as-of 2022-07-05

echo "== 6. check: one outbox line per eligible recipient, and the delivery log agrees"
python scripts/demo_check.py var/outbox.jsonl "$RUN"

echo "== 7. auditors: the hash-chained ledger verifies, and this quarter's coverage by district and group"
dispatch audit verify
dispatch report coverage

echo "== 8. the annual assessment (考核): this quarter, every department and town against targets.yaml"
read -r YEAR QUARTER < <(python -c 'import datetime, os, zoneinfo; t=datetime.datetime.fromisoformat(os.environ["DISPATCH_FAKE_NOW"]) if os.environ.get("DISPATCH_FAKE_NOW") else datetime.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")); print(t.year, f"Q{(t.month - 1) // 3 + 1}")')
dispatch report assessment --year "$YEAR" --quarter "$QUARTER"

echo "== 9. early warning: one resident alerted by SMS and call at once (alerting.yaml), then the case closed"
RESIDENT=$(python -c 'import csv; print(next(csv.DictReader(open("var/residents.csv", encoding="utf-8")))["phone"])')
GRID=$(python -c 'import csv; print(next(csv.DictReader(open("var/residents.csv", encoding="utf-8")))["grid"])')
printf 'grid,role,name,phone\n%s,grid_worker,网格员,13900000001\n%s,police_duty,警格值班,13900000002\n' \
  "$GRID" "$GRID" > var/roster.csv
dispatch roster import var/roster.csv
ALERT=$(dispatch alert send --phone "$RESIDENT" --type impersonating_police --id DEMO-0001 --source "demo" --json \
  | python -c 'import json, sys; print(json.load(sys.stdin)["id"])')
dispatch alert close "$ALERT" --outcome dissuaded --note "demo: reached by phone, no transfer made"
dispatch alert status "$ALERT"

cat <<TXT

== done: run $RUN is in var/dispatch.db, the default delivery log. Next steps (see README):
   . .venv/bin/activate
   dispatch runs
   dispatch status $RUN
   dispatch audit log --run $RUN --limit 5
   dispatch users add alice --role operator   # asks for a password
   dispatch web                               # then open http://127.0.0.1:8000/dashboard
TXT
