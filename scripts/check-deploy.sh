#!/usr/bin/env bash
# Checks the manifests in deploy/ (CI runs this from scripts/test.sh): every object of
# deploy/trellis.yaml and deploy/examples/*.yaml against the Kubernetes schemas in
# strict mode (unknown fields are errors), the NADs against the CRD's own schema, the
# objects' references to each other, the agent's paths against the DaemonSet's mounts,
# and the ConfigMap's agent.toml and device-config.json through trellis itself
# (check-config, devices). Any problem fails it, named by file, line, object and field.
#
# Env: TRELLIS_BIN (default target/debug/trellis), KUBE_VERSIONS (default below),
# CHECK_DEPLOY_VENV (default /var/cache/trellis/venv).
set -euo pipefail
cd "$(dirname "$0")/.."

# The Kubernetes versions whose schemas the objects must satisfy: the oldest this
# deployment is for and the newest the pinned kubernetes-validate knows.
KUBE_VERSIONS=${KUBE_VERSIONS:-"1.30.0 1.37.0"}
TRELLIS_BIN=${TRELLIS_BIN:-target/debug/trellis}
VENV=${CHECK_DEPLOY_VENV:-/var/cache/trellis/venv}
REQUIREMENTS=scripts/deploy-requirements.txt

# Debian's own python3 (what setup.sh installs for), else the first on PATH.
if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=$(command -v python3 || true); fi
[ -n "$PYTHON" ] || { echo "check-deploy: python3 is missing (apt-get install python3 python3-venv)" >&2; exit 1; }

# The venv, made once and re-made only when the pins or the interpreter change.
stamp="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1) $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')"
if [ "$(cat "$VENV/.trellis-stamp" 2>/dev/null)" != "$stamp" ] || ! "$VENV/bin/python" -c '' 2>/dev/null; then
  if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "check-deploy: $PYTHON cannot make a venv: apt-get install python3-venv" >&2
    exit 1
  fi
  echo "check-deploy: installing $REQUIREMENTS into $VENV"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
  # --no-deps: exactly the pinned set; pip check: and it is complete.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$REQUIREMENTS"
  "$VENV/bin/pip" check --disable-pip-version-check >/dev/null \
    || { "$VENV/bin/pip" check; echo "check-deploy: $REQUIREMENTS is not a complete set" >&2; exit 1; }
  echo "$stamp" > "$VENV/.trellis-stamp"
fi

exec "$VENV/bin/python" scripts/check-deploy.py \
  --kube-versions "$KUBE_VERSIONS" \
  --image "localhost/trellis:$(bash scripts/image.sh --print-version)" \
  --trellis-bin "$TRELLIS_BIN"
