#!/usr/bin/env bash
# Builds the functions and deploys infra/template.yaml with `sam deploy`.
#
#   infra/deploy.sh [--stack NAME] [--param KEY=VALUE]... [-- SAM_DEPLOY_ARGS...]
#       AWS: arm64 binaries built by `sam build` (cargo lambda), then
#       `sam deploy` to the account and region of your credentials.
#       First time: add `-- --guided` to choose the region and parameters.
#
#   infra/deploy.sh --emulated [--stack NAME] [--param KEY=VALUE]... [-- SAM_DEPLOY_ARGS...]
#       No account: starts the ministack emulator (installed under
#       target/emulated-aws on first use) and deploys the same template to
#       it, with the x86_64 debug binaries that `cargo build --workspace
#       --bins` makes (the test command builds them; nothing is compiled
#       twice). Destinations may point at loopback addresses there.
#
#   infra/deploy.sh --emulated --down
#       Stops the emulator and forgets its state.
#
# Both print one JSON line: stack, api_url, browser_url (where a browser
# opens the explorer, `/ui` under it), table, endpoint_url (emulated
# only), region and the queues. With AWS_ENDPOINT_URL set to endpoint_url,
# `kindred space create ID --dynamodb-table TABLE` creates a space there.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

emulated=false
down=false
stack=kindred
sam_args=()
params=()
while [ $# -gt 0 ]; do
  case "$1" in
    --emulated) emulated=true ;;
    --down) down=true ;;
    --stack) stack="$2"; shift ;;
    --param) params+=("$2"); shift ;;
    --) shift; sam_args=("$@"); break ;;
    *) echo "unknown argument: $1 (see the top of infra/deploy.sh)" >&2; exit 2 ;;
  esac
  shift
done

# The SAM CLI (and cfn-lint), pinned, in a venv of their own.
infra_venv="$root/target/infra-venv"
if ! "$infra_venv/bin/sam" --version >/dev/null 2>&1 || ! "$infra_venv/bin/cfn-lint" --version >/dev/null 2>&1; then
  python3 -m venv "$infra_venv"
  "$infra_venv/bin/pip" install --quiet --disable-pip-version-check aws-sam-cli==1.170.0 cfn-lint==1.58.0
fi
export SAM_CLI_TELEMETRY=0
sam="$infra_venv/bin/sam"

outputs() { # stack -> the stack's outputs as one JSON object
  "$infra_venv/bin/python" - "$1" <<'PY'
import json, sys, boto3
stack = boto3.client("cloudformation").describe_stacks(StackName=sys.argv[1])["Stacks"][0]
print(json.dumps({o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}))
PY
}

summary() { # outputs JSON, endpoint ("" on AWS) -> the one JSON line
  "$infra_venv/bin/python" - "$stack" "$1" "$2" <<'PY'
import json, os, sys
stack, out, endpoint = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
api_url = out["ApiUrl"]
# Where a browser opens the API: the API's own address on AWS; on the
# emulator its per-API host (`*.localhost` is this machine to a browser),
# so that pages live under `/prod` as they do on AWS.
browser_url = api_url
if endpoint:
    api_url = f"{endpoint}/_aws/execute-api/{out['ApiId']}/prod"
    port = endpoint.rsplit(":", 1)[1]
    browser_url = f"http://{out['ApiId']}.execute-api.localhost:{port}/prod"
print(json.dumps({
    "stack": stack,
    "api_url": api_url,
    "browser_url": browser_url,
    "table": out["TableName"],
    "endpoint_url": endpoint or None,
    "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
    "expiry_function": out.get("ExpiryFunctionName"),
    "queues": {k: v for k, v in out.items() if k.endswith("QueueUrl")},
    "log_groups": {k: v for k, v in out.items() if k.endswith("LogGroup")},
}))
PY
}

if [ "$emulated" = false ]; then
  (cd infra && "$sam" build)
  overrides=()
  if [ ${#params[@]} -gt 0 ]; then overrides=(--parameter-overrides "${params[@]}"); fi
  (cd infra && "$sam" deploy --stack-name "$stack" --resolve-s3 \
    --capabilities CAPABILITY_IAM CAPABILITY_AUTO_EXPAND \
    --no-fail-on-empty-changeset "${overrides[@]}" "${sam_args[@]}")
  summary "$(outputs "$stack")" ""
  exit 0
fi

# ---- the emulated account -------------------------------------------------
state="$root/target/emulated-aws"
if [ "$down" = true ]; then
  if [ -f "$state/pgid" ]; then
    kill -TERM -- "-$(cat "$state/pgid")" 2>/dev/null || true
    sleep 0.5
    kill -KILL -- "-$(cat "$state/pgid")" 2>/dev/null || true
  fi
  rm -rf "$state/run"
  rm -f "$state/pgid" "$state/port"
  echo '{"stopped": true}'
  exit 0
fi

# ministack 1.5.33 with the SAM transform (it runs CloudFormation, Lambda
# bootstraps as local processes, API Gateway, SQS, DynamoDB, EventBridge,
# Secrets Manager, S3).
venv="$state/venv"
if ! "$venv/bin/python" -c "import ministack, samtranslator" 2>/dev/null; then
  echo "installing ministack 1.5.33 and aws-sam-translator 1.115.0 (PyPI)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check ministack==1.5.33 aws-sam-translator==1.115.0
fi

export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL_DYNAMODB AWS_ENDPOINT_URL_SQS

healthy() { curl -sf "http://127.0.0.1:$1/_ministack/health" >/dev/null 2>&1; }
port=""
if [ -f "$state/port" ] && healthy "$(cat "$state/port")"; then
  port=$(cat "$state/port")
else
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  rm -rf "$state/run"
  mkdir -p "$state/run/tmp" "$state/run/state"
  # Its own process group (the functions' bootstraps run in it, and are
  # stopped with it); functions inherit this environment.
  (cd "$state/run" && exec env GATEWAY_PORT="$port" BIND_HOST=127.0.0.1 IOT_MTLS_ENABLED=0 \
    TMPDIR="$state/run/tmp" STATE_DIR="$state/run/state" PYTHONDONTWRITEBYTECODE=1 \
    AWS_ENDPOINT_URL="http://127.0.0.1:$port" \
    setsid "$venv/bin/ministack") >"$state/run/ministack.log" 2>&1 </dev/null &
  echo $! >"$state/pgid"
  for _ in $(seq 1 150); do healthy "$port" && break; sleep 0.2; done
  if ! healthy "$port"; then
    echo "ministack did not start; its log:" >&2
    cat "$state/run/ministack.log" >&2
    exit 1
  fi
  echo "$port" >"$state/port"
fi
endpoint="http://127.0.0.1:$port"
export AWS_ENDPOINT_URL="$endpoint"

# The functions: the debug binaries, staged as `bootstrap` per function.
cargo build --workspace --locked --bins >&2
build="$state/build"
rm -rf "$build"
mkdir -p "$build"
"$infra_venv/bin/python" - "$root/infra/template.yaml" "$build" "$root/target/debug" <<'PY'
import os, re, shutil, sys
template, build, binaries = sys.argv[1:4]
text = open(template).read()
# Each function's `Binary:` (its BuildProperties) names the cargo binary;
# its `CodeUri: ..` (the workspace, for `sam build`) becomes the staged
# directory, as `sam build` itself would write it.
pattern = re.compile(r"^  (\w+):\n    Type: AWS::Serverless::Function\n(?:(?!^  \w).*\n)*?        Binary: ([\w-]+)\n", re.M)
found = 0
for m in pattern.finditer(text):
    name, binary = m.group(1), m.group(2)
    target = os.path.join(build, name)
    os.makedirs(target)
    shutil.copy(os.path.join(binaries, binary), os.path.join(target, "bootstrap"))
    found += 1
out = []
current = None
for line in text.splitlines(keepends=True):
    m = re.match(r"^  (\w+):\n", line)
    if m:
        current = m.group(1)
    if line.strip() == "CodeUri: .." and current:
        line = line.replace("..", os.path.join(build, current))
    out.append(line.replace("Architectures: [arm64]", "Architectures: [x86_64]"))
open(os.path.join(build, "template.yaml"), "w").writelines(out)
if found != 7:
    sys.exit(f"expected 7 functions in the template, found {found}")
PY

"$infra_venv/bin/python" -c "import boto3; s3 = boto3.client('s3'); s3.create_bucket(Bucket='kindred-artifacts')" 2>/dev/null || true
"$sam" deploy --template-file "$build/template.yaml" --stack-name "$stack" \
  --s3-bucket kindred-artifacts --capabilities CAPABILITY_IAM CAPABILITY_AUTO_EXPAND \
  --no-confirm-changeset --no-fail-on-empty-changeset --region us-east-1 \
  --parameter-overrides AllowPrivateDestinations=true "${params[@]}" "${sam_args[@]}" >&2
summary "$(outputs "$stack")" "$endpoint"
