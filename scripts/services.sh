#!/usr/bin/env bash
# PostgreSQL (127.0.0.1:5432, database `test`) and Redis (127.0.0.1:6379) for the tests:
# started when they are down, as on CI; otherwise one line naming what is missing and
# the command that starts it. `make test` and .ci/run call this.
set -uo pipefail
ok=1
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  if [ -d /etc/postgresql ] && command -v pg_ctlcluster >/dev/null; then
    echo "PostgreSQL is down: starting it"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
    for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && break; sleep 0.5; done
  fi
  if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    echo "PostgreSQL is not running on 127.0.0.1:5432: start it with" \
      "'pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start'" >&2
    ok=0
  fi
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  if command -v redis-server >/dev/null; then
    echo "Redis is down: starting it"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null || true
    for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "Redis is not running on 127.0.0.1:6379: start it with" \
      "'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no'" >&2
    ok=0
  fi
fi
[ "$ok" = 1 ]
