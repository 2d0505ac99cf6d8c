"""Subscribe make run's demo camera: a generated scene clip played in a loop at its own
frame rate (a stand-in for an RTSP camera; point `rtspUrl` at a real one instead)."""

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clip", type=Path, required=True)
    parser.add_argument("--id", default="demo-display;demo-camera")
    args = parser.parse_args()
    body = {"subscriptionIdentifier": args.id, "fileUrl": str(args.clip.resolve())}
    request = urllib.request.Request(
        f"{args.url}/streams",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            print(f"demo camera subscribed: {json.load(response)['subscriptionIdentifier']}")
    except urllib.error.HTTPError as exc:
        print(f"subscribing the demo camera failed: {exc.code} {exc.read()!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
