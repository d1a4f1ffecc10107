#!/bin/bash
# Times the explorer's pages, /openapi.json and /metrics on a loaded server
# (BENCHMARKS.md, "Issue 20"): a fresh `kindred serve`, two audiences, the
# bench workload's batches sent by drive.py, then 7 fetches of each page.
#
#   tests/perf/explorer.sh target/release/kindred
#
# BATCHES: the batch files of shared/bench/gen.py --batch-out (default
# /tmp/kindred-1m-batches); DRIVE: shared/bench/drive.py.
BIN=$1; D=/tmp/kd-ui; rm -rf $D; mkdir -p $D
$BIN serve --data-dir $D/data --listen 127.0.0.1:18082 --metrics-listen 127.0.0.1:19465 > $D/serve.out 2> $D/serve.err &
PID=$!
for i in $(seq 1 100); do grep -q listening $D/serve.out 2>/dev/null && break; sleep 0.1; done
eval $(python3 -c "
import json
t=open('$D/serve.out').read(); j=json.loads(t[t.index('{'):t.rindex('}')+1])
print(f\"WK={j['write_key']} AT={j['access_token']} ADM={j['admin_token']}\")")
B=http://127.0.0.1:18082
curl -s -u "$ADM:" -X PUT $B/v1/spaces/default/audiences/buyers -H 'content-type: application/json' -d '{"condition": {"performed": {"event": "Order Completed", "count": {"at_least": 1}}}}' > /dev/null
curl -s -u "$ADM:" -X PUT $B/v1/spaces/default/audiences/browsers -H 'content-type: application/json' -d '{"condition": {"performed": {"event": "Product Viewed", "count": {"at_least": 3}}}}' > /dev/null
python3 "${DRIVE:-$(dirname "$0")/../../../shared/bench/drive.py}" --url $B --write-key $WK --data-dir $D/data --batches ${BATCHES:-/tmp/kindred-1m-batches} --connections 4 > $D/drive.log 2>&1
tail -3 $D/drive.log
for i in $(seq 1 600); do
  lag=$(curl -s $B/healthz | python3 -c "import json,sys; j=json.load(sys.stdin); print(j.get('queue_lag_events',0)+j.get('compute_lag_events',0))")
  [ "$lag" = "0" ] && break; sleep 1
done
echo "settled after $i s"
J=$D/jar; rm -f $J
curl -s -c $J -o /dev/null -d "token=$ADM" $B/ui/session
PRF=$(curl -s -b $J -o /dev/null -w '%{redirect_url}' -d "q=user_id:u0000001" $B/ui/search | sed 's|.*/ui/profiles/||')
[ -z "$PRF" ] && PRF=$(curl -s -b $J "$B/ui/computations/audience/buyers" | grep -o 'prf_[A-Za-z0-9]*' | head -1)
echo "profile $PRF"
t() { # name url -> 7 timings (ms), median and max
  for k in 1 2 3 4 5 6 7; do curl -s -b $J -o /dev/null -w '%{time_total}\n' "$1"; done | sort -n | awk -v n="$2" '{a[NR]=$1*1000} END {printf "%-28s median %.1f ms  max %.1f ms\n", n, a[4], a[7]}'
}
t "$B/ui/computations" "/ui/computations"
t "$B/ui/computations/audience/buyers" "members page (50)"
t "$B/ui/profiles/$PRF" "profile page"
t "$B/ui/changes" "/ui/changes"
t "$B/openapi.json" "/openapi.json"
t "http://127.0.0.1:19465/metrics" "/metrics"
curl -s -b $J "$B/ui/computations" | grep -o '<td>[0-9]*</td>' | head -4
kill $PID; wait $PID 2>/dev/null
