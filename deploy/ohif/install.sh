#!/usr/bin/env bash
# Installs what the OHIF viewer and tests/test_ohif.py need, once: the prebuilt OHIF viewer (@ohif/app,
# pinned; only its dist/ is used, so the package tarball is fetched with `npm pack`, no dependency tree)
# into .cache/ohif/<version>/package/dist, and Debian's chromium for the headless browser test.
# Orthanc + orthanc-dicomweb come from scripts/bootstrap.sh. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/../.."
OHIF_VERSION=${OHIF_VERSION:-3.13.2}   # keep in step with radnode/viewer.py OHIF_VERSION
CACHE=.cache/ohif
DIST="$CACHE/$OHIF_VERSION/package/dist"

if [ ! -f "$DIST/index.html" ]; then
  command -v npm >/dev/null || { echo "install.sh: npm is needed (apt-get install npm)" >&2; exit 1; }
  mkdir -p "$CACHE/$OHIF_VERSION"
  echo "install.sh: fetching @ohif/app@$OHIF_VERSION (about 50 MB, 200 MB unpacked)" >&2
  tarball=$(cd "$CACHE" && npm pack --silent "@ohif/app@$OHIF_VERSION" 2>/dev/null | tail -1)
  tar -xzf "$CACHE/$tarball" -C "$CACHE/$OHIF_VERSION"
  rm -f "$CACHE/$tarball"
  test -f "$DIST/index.html"
fi

if ! command -v chromium >/dev/null && [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "install.sh: installing Debian chromium (about 115 MB download, 480 MB on disk)" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
echo "install.sh: OHIF $OHIF_VERSION in $DIST; $(/usr/bin/chromium --version 2>/dev/null)" >&2
