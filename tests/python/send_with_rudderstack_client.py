"""Sends identify, track and group calls with RudderStack's Python SDK
(rudder-sdk-python, gzip on), pointed at a Kindred server with
`dataPlaneUrl`. The SDK sends an identify's traits in `context.traits`
only. Exits non-zero if the SDK reports any error.
Usage: send_with_rudderstack_client.py WRITE_KEY DATA_PLANE_URL"""

import sys

import rudderstack.analytics as rudder_analytics

errors = []
rudder_analytics.write_key = sys.argv[1]
rudder_analytics.dataPlaneUrl = sys.argv[2]
rudder_analytics.gzip = True
rudder_analytics.max_retries = 1
rudder_analytics.on_error = lambda error, batch: errors.append(repr(error))

rudder_analytics.identify(
    user_id="rs-user",
    anonymous_id="rs-anon",
    traits={"email": "RS.User@Example.com", "plan": "scale"},
)
rudder_analytics.track(user_id="rs-user", event="Order Completed", properties={"revenue": 12.5})
rudder_analytics.group(user_id="rs-user", group_id="acct-rs", traits={"name": "RS Inc"})
rudder_analytics.flush()
rudder_analytics.shutdown()

if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
print("sent")
