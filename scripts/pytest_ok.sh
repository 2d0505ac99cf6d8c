#!/usr/bin/env bash
# Runs pytest and treats "no tests collected" (exit 5) as a failure with a clear message.
"$@"
rc=$?
if [ "$rc" = 5 ]; then echo "pytest collected no tests: $*" >&2; exit 1; fi
exit "$rc"
