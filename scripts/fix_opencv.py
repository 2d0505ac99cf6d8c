"""Keep exactly one working cv2: ultralytics pulls `opencv-python` next to the headless
build, and whichever installs last owns the shared `cv2` folder. Reinstall headless if
`import cv2` fails (e.g. no libGL on a server)."""

import subprocess
import sys

try:
    import cv2  # noqa: F401
except ImportError as exc:
    print(f"cv2 import failed ({exc}); reinstalling opencv-python-headless", file=sys.stderr)
    subprocess.check_call(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--force-reinstall",
            "--no-deps",
            "opencv-python-headless",
        ]
    )
