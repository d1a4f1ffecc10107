#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, every crate's
# tests and the end-to-end tests. Installs what it needs by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
if ! command -v cargo-nextest >/dev/null; then
  cargo install --locked cargo-nextest
fi

# Segment's and RudderStack's real Python clients, for the
# client-compatibility tests.
venv="$PWD/target/pyclient"
if ! "$venv/bin/python" -c "import segment.analytics, rudderstack.analytics" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    segment-analytics-python==2.4.0 rudder-sdk-python==2.1.9
fi
export KINDRED_PYTHON="$venv/bin/python"

# Headless Chromium (Debian's) and Segment's browser library from npm
# (versions pinned in tests/browser/package-lock.json), for the browser
# tests in tests/tests/browser.rs.
if ! command -v chromium >/dev/null; then
  apt_get=(apt-get)
  if [ "$(id -u)" != 0 ]; then apt_get=(sudo apt-get); fi
  export DEBIAN_FRONTEND=noninteractive
  "${apt_get[@]}" install -y -q chromium >/dev/null \
    || { "${apt_get[@]}" update -q >/dev/null && "${apt_get[@]}" install -y -q chromium >/dev/null; }
fi
if ! command -v node >/dev/null; then
  echo "Node.js (with npm) is required for the browser tests" >&2
  exit 1
fi
if [ ! -d tests/browser/node_modules/@segment/analytics-next ]; then
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
# RudderStack's Node.js SDK (pinned in tests/node/package-lock.json).
if [ ! -d tests/node/node_modules/@rudderstack/rudder-sdk-node ]; then
  (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
fi
export KINDRED_BROWSER_TESTS=1

# Schemathesis (PyPI), for the OpenAPI check in tests/tests/openapi.rs.
api_venv="$PWD/target/api-venv"
if ! "$api_venv/bin/schemathesis" --version 2>/dev/null | grep -q "4.32.5"; then
  python3 -m venv "$api_venv"
  "$api_venv/bin/pip" install --quiet --disable-pip-version-check schemathesis==4.32.5
fi
export KINDRED_SCHEMATHESIS="$api_venv/bin/schemathesis"

# The AWS template: cfn-lint, and SAM's own validation of its resources
# (both offline, no credentials needed).
infra_venv="$PWD/target/infra-venv"
if ! "$infra_venv/bin/sam" --version >/dev/null 2>&1 || ! "$infra_venv/bin/cfn-lint" --version >/dev/null 2>&1; then
  python3 -m venv "$infra_venv"
  "$infra_venv/bin/pip" install --quiet --disable-pip-version-check aws-sam-cli==1.170.0 cfn-lint==1.58.0
fi
"$infra_venv/bin/cfn-lint" infra/template.yaml
SAM_CLI_TELEMETRY=0 "$infra_venv/bin/sam" validate --lint --region us-east-1 -t infra/template.yaml

# A fresh CI clone gains nothing from incremental compilation, and its
# caches double the disk the build needs.
if [ "${CI:-}" = "true" ]; then
  export CARGO_INCREMENTAL=0
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --locked --bins
# DynamoDB Local and ministack (SQS), on free ports, stopped on exit.
source tests/emulators.sh
# The real template deployed on an emulated AWS account (ministack, with
# the debug binaries just built), for tests/tests/deployed.rs; the same
# script and template the README deploys to AWS with.
deployed=$(infra/deploy.sh --emulated)
export KINDRED_DEPLOYED="$deployed"
trap 'infra/deploy.sh --emulated --down >/dev/null || true; stop_emulators' EXIT
./fuzz/run.sh 20
cargo nextest run --workspace --locked --no-fail-fast
