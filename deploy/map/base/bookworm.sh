#!/usr/bin/env bash
# The minimal Debian bookworm base for radnode's MAP images (Python 3.11 with venv), made offline: no
# image registry, only the Debian mirror apt already uses. debootstrap → strip → `ENGINE import`.
#
#   deploy/map/base/bookworm.sh [ENGINE [ENGINE-ARGS...]]     e.g.  bookworm.sh podman --runtime runc
#
# Prints the image name on stdout: localhost/radnode-map-base:bookworm-KEY, KEY a digest of this
# script, the suite, the package list and the mirror (its inputs), so the image is built once per
# engine store and rebuilt only when one of them changes; it is tagged ...:bookworm too. Needs root
# (debootstrap, chroot) and debootstrap.
# DEBIAN_MIRROR overrides the mirror; by default it is the bookworm mirror in apt's own sources.
set -euo pipefail
ENGINE=("$@")
[ ${#ENGINE[@]} -gt 0 ] || ENGINE=(podman)
SUITE=bookworm
PACKAGES=python3,python3-venv

mirror_from_apt() {  # the first non-security bookworm URI in apt's sources (deb822 or one-line format)
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v suite="$SUITE" '
      /^URIs:/ {uri=$2} /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == suite) ok=1}
      /^$/ {if (ok && uri !~ /security/) {print uri; found=1; exit} ok=0; uri=""}
      END {if (!found && ok && uri !~ /security/) print uri}' "$f"
  done
  if [ -f /etc/apt/sources.list ]; then
    awk -v suite="$SUITE" '$1 == "deb" && $3 == suite && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list
  fi
}
MIRROR=${DEBIAN_MIRROR:-$(mirror_from_apt | head -n1)}
[ -n "$MIRROR" ] || { echo "bookworm.sh: no bookworm mirror in apt's sources; set DEBIAN_MIRROR" >&2; exit 2; }

KEY=$( { cat "$0"; echo "$SUITE $PACKAGES $MIRROR"; } | sha256sum | cut -c1-12)
IMAGE=localhost/radnode-map-base:$SUITE-$KEY
if "${ENGINE[@]}" image inspect "$IMAGE" >/dev/null 2>&1; then
  "${ENGINE[@]}" tag "$IMAGE" "${IMAGE%-*}" >/dev/null; echo "$IMAGE"; exit 0
fi
command -v debootstrap >/dev/null || { echo "bookworm.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }

ROOT=$(mktemp -d /var/tmp/radnode-base.XXXXXX)
LOG=$ROOT.log
trap 'rm -rf "$ROOT" "$LOG"' EXIT
echo "bookworm.sh: debootstrap $SUITE from $MIRROR (minbase + $PACKAGES)" >&2
# Two stages, so dpkg in the second runs with force-unsafe-io (no fsync per file: about half the time; the
# tree is thrown away if anything fails, so nothing depends on those writes surviving a crash).
if ! debootstrap --foreign --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >"$LOG" 2>&1 \
   || ! { mkdir -p "$ROOT/etc/dpkg/dpkg.cfg.d" && echo force-unsafe-io >"$ROOT/etc/dpkg/dpkg.cfg.d/radnode-build" \
          && chroot "$ROOT" /debootstrap/debootstrap --second-stage >>"$LOG" 2>&1; }; then
  tail -n 20 "$LOG" >&2; exit 1
fi
# What a container never uses: the build's dpkg setting, downloaded packages, package lists, manuals and
# info pages. (Copyright files under /usr/share/doc stay: they are the licences of what the image ships.)
rm -rf "$ROOT"/etc/dpkg/dpkg.cfg.d/radnode-build "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* \
       "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/var/log/* "$ROOT"/var/cache/debconf/*-old
find "$ROOT"/usr/share/doc -mindepth 2 ! -name copyright -type f -delete
tar --numeric-owner -C "$ROOT" -c . | "${ENGINE[@]}" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'LABEL org.opencontainers.image.title="radnode MAP base: Debian bookworm minbase + Python 3.11"' \
  --change "LABEL org.radnode.base.key=$KEY" \
  - "$IMAGE" >/dev/null
"${ENGINE[@]}" tag "$IMAGE" "${IMAGE%-*}" >/dev/null   # the stable name the MAP Dockerfile defaults to
echo "$IMAGE"
