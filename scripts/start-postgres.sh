#!/usr/bin/env bash
# Starts PostgreSQL with pgvector for the scale-out tests and prints its URL (a unix socket). Both come
# from the PyPI `pgserver` package, installed into a virtual environment; nothing else is needed.
# Idempotent: a running server is reused. As root, pgserver runs the server as a `pgserver` user.
#   export VISENC_TEST_POSTGRES="$(./scripts/start-postgres.sh)"
#   ./scripts/start-postgres.sh --stop
set -euo pipefail
venv=${VISENC_PG_VENV:-/tmp/visenc-pgserver-venv}
data=${VISENC_PG_DATA:-/tmp/visenc-pgdata}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2 || { apt-get update -qq >&2 && apt-get install -y -qq python3-venv >&2 && python3 -m venv "$venv" >&2; }
fi
"$venv/bin/python" -c "import pgserver" 2>/dev/null || "$venv/bin/pip" install -q pgserver==0.1.4 >&2
"$venv/bin/python" - "$data" "${1:-}" <<'PY'
import sys, warnings
warnings.simplefilter("ignore")
import pgserver
server = pgserver.get_server(sys.argv[1], cleanup_mode=None)
if sys.argv[2] == "--stop":
    server.cleanup_mode = "stop"
    server.cleanup()
else:
    server.psql("CREATE EXTENSION IF NOT EXISTS vector;")
    print(server.get_uri())
PY
