# Installs (once, under target/emulators) and starts the AWS emulators the
# DynamoDB and SQS tests run against, on free loopback ports, and exports
# the environment the SDK and the tests read. Sourced by tests/run-all.sh;
# the emulators stop when the sourcing shell exits.
#
#   DynamoDB Local 1.25 (AWS's own emulator, shipped in the npm package
#   amplify-dynamodb-simulator), on Java 17, in memory.
#   ministack 1.5.33 (PyPI) for SQS.
#
# Use it by hand with:  source tests/emulators.sh && cargo nextest run

emu_dir="$PWD/target/emulators"
mkdir -p "$emu_dir"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # port, name, log
  for _ in $(seq 1 300); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "$2 did not start on port $1; its log:" >&2
  cat "$3" >&2
  return 1
}

if ! command -v java >/dev/null; then
  echo "installing Java 17 for DynamoDB Local" >&2
  apt-get install -y -q openjdk-17-jre-headless >/dev/null
fi
dynamo_home="$emu_dir/node_modules/amplify-dynamodb-simulator/emulator"
if [ ! -f "$dynamo_home/DynamoDBLocal.jar" ]; then
  echo "installing DynamoDB Local (npm amplify-dynamodb-simulator@2.9.30)" >&2
  npm install --prefix "$emu_dir" --no-audit --no-fund --loglevel=error amplify-dynamodb-simulator@2.9.30 >/dev/null
fi
ministack_venv="$emu_dir/ministack-venv"
if ! "$ministack_venv/bin/python" -c "import ministack" 2>/dev/null; then
  echo "installing ministack 1.5.33 (PyPI)" >&2
  python3 -m venv "$ministack_venv"
  "$ministack_venv/bin/pip" install --quiet --disable-pip-version-check ministack==1.5.33
fi

dynamo_port=$(free_port)
(cd "$dynamo_home" && exec java -Xmx1g -Djava.library.path=./DynamoDBLocal_lib \
  -jar DynamoDBLocal.jar -inMemory -sharedDb -port "$dynamo_port") \
  >"$emu_dir/dynamodb.log" 2>&1 &
dynamo_pid=$!
sqs_port=$(free_port)
GATEWAY_PORT=$sqs_port BIND_HOST=127.0.0.1 "$ministack_venv/bin/ministack" \
  >"$emu_dir/ministack.log" 2>&1 &
sqs_pid=$!
stop_emulators() {
  kill "$dynamo_pid" "$sqs_pid" 2>/dev/null || true
  wait "$dynamo_pid" "$sqs_pid" 2>/dev/null || true
}
trap stop_emulators EXIT
wait_port "$dynamo_port" "DynamoDB Local" "$emu_dir/dynamodb.log"
wait_port "$sqs_port" "ministack" "$emu_dir/ministack.log"

export AWS_ENDPOINT_URL_DYNAMODB="http://127.0.0.1:$dynamo_port"
export AWS_ENDPOINT_URL_SQS="http://127.0.0.1:$sqs_port"
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
export KINDRED_EMULATORS=1
echo "emulators: DynamoDB Local on $dynamo_port, ministack (SQS) on $sqs_port" >&2
