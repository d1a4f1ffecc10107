"""Sends Segment calls given as JSON (one list of [method, args, kwargs]
per invocation) with Segment's own Python library, gzip on, to the API of
a deployed stack. Exits non-zero if the library reports any error.

Usage: send_deployed.py WRITE_KEY HOST CALLS_JSON"""

import json
import sys
from datetime import datetime

import segment.analytics as analytics

errors = []
analytics.write_key = sys.argv[1]
analytics.host = sys.argv[2]
analytics.gzip = True
analytics.max_retries = 2
analytics.on_error = lambda error, batch: errors.append(repr(error))

for method, args, kwargs in json.loads(sys.argv[3]):
    if "timestamp" in kwargs:
        # The library takes a datetime; JSON carries RFC 3339.
        kwargs["timestamp"] = datetime.fromisoformat(kwargs["timestamp"].replace("Z", "+00:00"))
    getattr(analytics, method)(*args, **kwargs)
analytics.flush()
analytics.shutdown()

if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
print("sent")
