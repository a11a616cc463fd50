#!/usr/bin/env bash
# MAP entrypoint (/var/holoscan/tools): makes the package self-describing, as the MAP specification asks.
#   (no argument)      run the application: app.json#command with the HOLOSCAN_* environment
#   show               print app.json and pkg.json
#   extract DIR        copy app.json, pkg.json and app.yaml to DIR
#   help               this text
set -euo pipefail
APP_JSON=${HOLOSCAN_APP_MANIFEST_PATH:-/etc/holoscan/app.json}
PKG_JSON=${HOLOSCAN_PKG_MANIFEST_PATH:-/etc/holoscan/pkg.json}
case "${1:-run}" in
  run)
    ulimit -s 32768 2>/dev/null || true
    # app.json#command is a JSON argv list; exec it without a shell.
    mapfile -t argv < <(python3 -c 'import json,sys; print("\n".join(json.loads(json.load(open(sys.argv[1]))["command"])))' "$APP_JSON")
    exec "${argv[@]}" ;;
  show)
    echo "== app.json ($APP_JSON)"; cat "$APP_JSON"; echo "== pkg.json ($PKG_JSON)"; cat "$PKG_JSON" ;;
  extract)
    dest=${2:?usage: extract DIR}; mkdir -p "$dest"
    cp "$APP_JSON" "$PKG_JSON" "$dest/"; cp "${HOLOSCAN_CONFIG_PATH:-/var/holoscan/app.yaml}" "$dest/" ;;
  help|-h|--help) sed -n '2,7p' "$0" ;;
  *) echo "unknown command: $1 (try: show, extract DIR, help)" >&2; exit 2 ;;
esac
