"""Wait until camgraph's /health says every model is enabled (or time out with why)."""

import argparse
import json
import sys
import time
import urllib.request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--timeout-s", type=float, default=240)
    args = parser.parse_args()
    deadline, last = time.monotonic() + args.timeout_s, "no answer yet"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{args.url}/health", timeout=5) as response:
                body = json.load(response)
            models = body.get("models", {})
            last = ", ".join(f"{k}={v.get('state')}" for k, v in models.items())
            if any(v.get("state") == "error" for v in models.values()):
                print(f"a model failed to load: {json.dumps(models)}", file=sys.stderr)
                return 1
            if body.get("status") == "ok":
                print(f"ready: {last}")
                return 0
        except OSError as exc:
            last = str(exc)
        time.sleep(1)
    print(f"not ready after {args.timeout_s}s: {last}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
