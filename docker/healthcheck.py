"""Container HEALTHCHECK: exit 0 when the admin API's /healthz answers 200 (standard library only)."""

import os
import sys
import urllib.request

url = os.environ.get("TURNOUT_HEALTH_URL", "http://127.0.0.1:8081/healthz")
try:
    with urllib.request.urlopen(url, timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError as e:
    print(f"{url}: {e}", file=sys.stderr)
    sys.exit(1)
