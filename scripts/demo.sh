#!/usr/bin/env bash
# End-to-end demo on the embedded defaults: synthetic registry -> validate -> preview -> run -> check.
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

echo "== 2. validate every campaign"
dispatch validate campaigns

echo "== 3. preview $CAMPAIGN (sends nothing)"
dispatch preview "$CAMPAIGN"

echo "== 4. run it on the embedded broker and the outbox gateway"
RUN=$(dispatch run "$CAMPAIGN")

echo "== 5. check: one outbox line per eligible recipient, and the delivery log agrees"
python scripts/demo_check.py var/outbox.jsonl "$RUN"

echo "== 6. auditors: the hash-chained ledger verifies, and this quarter's coverage by district and group"
dispatch audit verify
dispatch report coverage

echo "== 7. the annual assessment (考核): this quarter, every department and town against targets.yaml"
read -r YEAR QUARTER < <(python -c 'import datetime, os, zoneinfo; t=datetime.datetime.fromisoformat(os.environ["DISPATCH_FAKE_NOW"]) if os.environ.get("DISPATCH_FAKE_NOW") else datetime.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")); print(t.year, f"Q{(t.month - 1) // 3 + 1}")')
dispatch report assessment --year "$YEAR" --quarter "$QUARTER"

cat <<TXT

== done: run $RUN is in var/dispatch.db, the default delivery log. Next steps (see README):
   . .venv/bin/activate
   dispatch runs
   dispatch status $RUN
   dispatch audit log --run $RUN --limit 5
   dispatch users add alice --role operator   # asks for a password
   dispatch web                               # then open http://127.0.0.1:8000/dashboard
TXT
