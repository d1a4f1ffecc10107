"""Measures the account pass (account-level audiences and computed traits)
on a running `kindred serve`: sends ACCOUNTS accounts of USERS users each
(a group call per user, an identify with a plan, an order per buyer),
defines a user audience, "any" and "all" account audiences and an account
event counter, waits until the events are applied, then times
`POST /v1/spaces/{space}/lookback/run` (which runs the pass) twice: the
first pass writes every account's values, the second finds them
unchanged. Prints the figures. Usage:

    account_pass.py BASE_URL WRITE_KEY ADMIN_TOKEN SPACE [ACCOUNTS] [USERS]
"""

import base64
import json
import sys
import time
import urllib.request


def call(method, url, token, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", "Basic " + base64.b64encode(f"{token}:".encode()).decode())
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read() or b"null")


def main():
    base, write_key, admin, space = sys.argv[1:5]
    accounts = int(sys.argv[5]) if len(sys.argv) > 5 else 2000
    users = int(sys.argv[6]) if len(sys.argv) > 6 else 5
    admin_url = f"{base}/v1/spaces/{space}"
    call("PUT", f"{admin_url}/audiences/pro_users", admin,
         {"condition": {"trait": {"name": "plan", "op": "=", "value": "pro"}}})
    for key, q in [("any_pro", "any"), ("all_pro", "all")]:
        call("PUT", f"{admin_url}/audiences/{key}", admin,
             {"collection": "accounts", "condition": {"users": {q: {"audience": "pro_users"}}}})
    call("PUT", f"{admin_url}/computed_traits/account_orders", admin,
         {"collection": "accounts", "type": "event_counter", "event": "Order Completed",
          "lookback": {"days": 30}})
    batch = []
    sent = 0
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for a in range(accounts):
        for u in range(users):
            user = f"a{a}-u{u}"
            plan = "pro" if (a + u) % 3 == 0 else "free"
            batch.append({"type": "identify", "userId": user, "traits": {"plan": plan}})
            batch.append({"type": "group", "userId": user, "groupId": f"acct-{a}",
                          "traits": {"name": f"Account {a}"}})
            batch.append({"type": "track", "userId": user, "event": "Order Completed",
                          "timestamp": now})
            if len(batch) >= 300:
                call("POST", f"{base}/v1/batch", write_key, {"batch": batch})
                sent += len(batch)
                batch = []
    if batch:
        call("POST", f"{base}/v1/batch", write_key, {"batch": batch})
        sent += len(batch)
    # Applied and computed: nothing waits in the queue or the compute step.
    while True:
        with urllib.request.urlopen(f"{base}/healthz", timeout=60) as r:
            h = json.loads(r.read())
        if h["queue_lag_events"] == 0 and h["compute_lag_events"] == 0:
            break
        time.sleep(1)
    for label in ["first pass (writes every account)", "second pass (nothing changes)"]:
        start = time.monotonic()
        run = call("POST", f"{admin_url}/lookback/run", admin, {})
        took = time.monotonic() - start
        n = run["accounts_computed"]
        print(f"{label}: {n} accounts of {users} users ({sent} events sent), "
              f"{run['account_changes']} changes, {took:.2f} s, {n / took:.0f} accounts/s, "
              f"{n * users / took:.0f} users/s")


if __name__ == "__main__":
    main()
