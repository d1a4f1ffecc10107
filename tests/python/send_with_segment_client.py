"""Sends events with Segment's own Python library (segment-analytics-python),
pointed at a Kindred server with `host=`. Exits non-zero if the library
reports any error. Usage: send_with_segment_client.py WRITE_KEY HOST [upgrade]
(with `upgrade`, only the second user's move to the pro plan)"""

import sys

import segment.analytics as analytics

errors = []
analytics.write_key = sys.argv[1]
analytics.host = sys.argv[2]
analytics.gzip = True
analytics.max_retries = 1
analytics.on_error = lambda error, batch: errors.append(repr(error))

upgrade = sys.argv[3:] == ["upgrade"]

if not upgrade:
    analytics.identify("py-user", {"email": "Py.User@Example.com", "plan": "pro"}, anonymous_id="py-anon")
    analytics.track("py-user", "Order Completed", {"revenue": 42.5, "currency": "EUR"})
    analytics.page("py-user", "Docs", "Getting Started", {"path": "/docs"})
    analytics.screen("py-user", "Onboarding", "Welcome")
    analytics.group("py-user", "acct-py", {"name": "Py Inc"})
    analytics.alias("py-anon-2", "py-user")
    # A second user of the same account, on another plan.
    analytics.identify("py-user-2", {"email": "py.two@example.com", "plan": "free"})
    analytics.group("py-user-2", "acct-py", {"industry": "software"})
else:
    analytics.identify("py-user-2", {"plan": "pro"})
analytics.flush()
analytics.shutdown()

if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
print("sent")
