#!/usr/bin/env bash
# A whole local federation, end to end, on embedded defaults:
# synthetic franchise -> CA -> enrolled sites with imported orders ->
# coordinator + one agent process per site over loopback QUIC -> rounds ->
# per-round table and final comparison (federated vs baselines vs local-only).
set -euo pipefail

usage() {
  cat <<'TXT'
Usage: scripts/demo.sh [--out DIR] [--sites N] [--customers C] [--rounds R] [--port P] [--api-port P]
                      [--admin-port P] [--epsilon E | --no-privacy] [--skip-local-only] [--release]
                      [--dangerous-disable-secure-aggregation]

  --out DIR    where everything is written (default ./demo-run; replaced if it exists)
  --sites N    number of restaurant sites (default 5, at least 3)
  --customers C  customers per site (default 100)
  --rounds R   training rounds (default 10)
  --epsilon E  the privacy budget per customer for the whole run, at delta 1e-6
               (default 4): the noise is calibrated so that R rounds fit in it
  --no-privacy no differential privacy noise (for comparison only)
  --local-epochs N  local passes over the data per round (per customer in private rounds; default 3)
  --server-lr L  step the coordinator applies to the averaged update
               (default 1 without privacy, and the coordinator's own default with it)
  --skip-local-only
               do not train the local-only comparison models (faster)
  --port P     the coordinator's UDP port on 127.0.0.1 (default 7443)
  --api-port P the first site's till API port on 127.0.0.1 (default 8477; the
               next sites take the following ports)
  --admin-port P  the coordinator's admin API and dashboard on 127.0.0.1 (default 9478)
  --release    build optimised binaries (slower first build, faster rounds)
  --dangerous-disable-secure-aggregation
               combine updates in the clear (for comparison only: the
               coordinator then sees every site's update; implies --no-privacy)

The coordinator's state, including metrics.jsonl, ends up in DIR/coordinator/,
process logs in DIR/logs/.
TXT
}

OUT=./demo-run
SITES=5
ROUNDS=10
CUSTOMERS=100
EPSILON=4
PRIVACY=true
LOCAL_ONLY=true
SERVER_LR=
EPOCHS=3
PORT=7443
API_BASE=8477
ADMIN_PORT=9478
PROFILE=debug
CARGO_FLAGS=()
INSECURE=false
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --sites) SITES="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --customers) CUSTOMERS="$2"; shift 2 ;;
    --epsilon) EPSILON="$2"; shift 2 ;;
    --no-privacy) PRIVACY=false; shift ;;
    --skip-local-only) LOCAL_ONLY=false; shift ;;
    --server-lr) SERVER_LR="$2"; shift 2 ;;
    --local-epochs) EPOCHS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --api-port) API_BASE="$2"; shift 2 ;;
    --admin-port) ADMIN_PORT="$2"; shift 2 ;;
    --release) PROFILE=release; CARGO_FLAGS=(--release); shift ;;
    --dangerous-disable-secure-aggregation) INSECURE=true; PRIVACY=false; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "demo.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
API_PORT=$API_BASE
if [ "$SITES" -lt 3 ]; then echo "demo.sh: --sites must be at least 3" >&2; exit 2; fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
echo "==> building (first build compiles burn and takes several minutes)"
cargo build --manifest-path "$ROOT/Cargo.toml" "${CARGO_FLAGS[@]}" -p potluck-coordinator -p potluck-agent
BIN="$ROOT/target/$PROFILE"
COORD="$BIN/potluck-coordinator"
AGENT="$BIN/potluck-agent"

PIDS=()
cleanup() {
  local status=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  exit "$status"
}
trap cleanup EXIT
trap 'echo "demo.sh: interrupted" >&2; exit 130' INT TERM

rm -rf "$OUT"
mkdir -p "$OUT/logs" "$OUT/sites"
OUT="$(cd "$OUT" && pwd)"

echo "==> generating a synthetic franchise of $SITES sites"
"$COORD" synth --out "$OUT/data" --sites "$SITES" --customers "$CUSTOMERS" --seed 7
echo "==> creating the franchise CA"
"$COORD" ca init --dir "$OUT/pki" --franchise "Demo Franchise"

cat > "$OUT/coordinator.toml" <<TOML
listen = "127.0.0.1:$PORT"
state_dir = "coordinator"
menu = "data/menu.csv"

[tls]
ca = "pki/ca.pem"
cert = "pki/coordinator.pem"
key = "pki/coordinator.key"

[rounds]
min_sites = $SITES
max_rounds = $ROUNDS
train_timeout_secs = 120
eval_timeout_secs = 60
retry_delay_secs = 2
${SERVER_LR:+server_learning_rate = $SERVER_LR}

[training]
epochs = $EPOCHS

[secagg]
dangerous_disable_secure_aggregation = $INSECURE

# Customer-level distributed differential privacy: the budget below is spent
# over the whole run; the noise is calibrated so that max_rounds fit in it.
[privacy]
enabled = $PRIVACY
target_epsilon = $EPSILON
delta = 1e-6
planned_rounds = $ROUNDS

# The admin API and dashboard (loopback only).
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
TOML
if [ "$PRIVACY" = true ]; then
  echo "==> privacy budget: epsilon $EPSILON at delta 1e-6 per customer, over $ROUNDS rounds"
else
  echo "==> WARNING: differential privacy is off for this run (comparison only)"
fi

SITE_IDS=()
for f in "$OUT"/data/site-*.csv; do SITE_IDS+=("$(basename "$f" .csv)"); done
echo "==> enrolling and importing ${#SITE_IDS[@]} sites"
for site in "${SITE_IDS[@]}"; do
  "$COORD" enroll --pki "$OUT/pki" --site "$site" --out "$OUT/sites/$site" \
    --coordinator "127.0.0.1:$PORT" --menu "$OUT/data/menu.csv" >/dev/null
  if [ "$PRIVACY" = false ]; then
    # Sites refuse rounds without privacy unless told otherwise.
    sed -i 's/^require = true$/require = false/' "$OUT/sites/$site/agent.toml"
  fi
  # The demo's sites hold synthetic customers: they report exact evaluation
  # counts, so that the dashboard can plot HR@10 per round. A real site keeps
  # this off (it is an uncharged counting oracle; see the README).
  sed -i 's/^dangerous_plain_evaluation = false$/dangerous_plain_evaluation = true/' "$OUT/sites/$site/agent.toml"
  # Each site's till API on its own port (127.0.0.1:8477, 8478, ...).
  sed -i "s/^listen = \"127.0.0.1:8477\"$/listen = \"127.0.0.1:$API_PORT\"/" "$OUT/sites/$site/agent.toml"
  API_PORT=$((API_PORT + 1))
  "$AGENT" import --config "$OUT/sites/$site/agent.toml" "$OUT/data/$site.csv"
done

VIEWER=$("$COORD" token create --config "$OUT/coordinator.toml" --name demo-viewer --role viewer 2>/dev/null)
echo "==> starting the coordinator and $SITES agents ($ROUNDS rounds)"
echo "    dashboard while it trains: http://127.0.0.1:$ADMIN_PORT/#token=$VIEWER"
echo "    (the coordinator stops after its last round; --rounds 200 --epsilon 8 gives time to watch)"
"$COORD" serve --config "$OUT/coordinator.toml" 2>"$OUT/logs/coordinator.log" &
COORD_PID=$!
PIDS+=("$COORD_PID")
for site in "${SITE_IDS[@]}"; do
  "$AGENT" run --config "$OUT/sites/$site/agent.toml" 2>"$OUT/logs/$site.log" &
  PIDS+=("$!")
done

# Show round lines as they complete. Wait in the `wait` builtin, which returns
# at once on Ctrl-C so the trap can stop everything.
tail -n +1 -f "$OUT/logs/coordinator.log" --pid "$COORD_PID" 2>/dev/null \
  | grep --line-buffered -E "round .* -> model|abandoned|ERROR" &
PIDS+=("$!")
if ! wait "$COORD_PID"; then
  echo "demo.sh: the coordinator failed; see $OUT/logs/coordinator.log" >&2
  exit 1
fi
# Ask the first site's till API (still running) for a consenting customer's recommendations.
FIRST="${SITE_IDS[0]}"
CUSTOMER=$(awk -F, 'NR > 1 && $6 == "true" { print $1; exit }' "$OUT/data/$FIRST.csv")
if command -v curl >/dev/null; then
  TOKEN=$(cat "$OUT/sites/$FIRST/state/api.token")
  echo "==> $FIRST's till API: GET /v1/customers/$CUSTOMER/recommendations?k=3"
  curl -sS -H "Authorization: Bearer $TOKEN" \
    "http://127.0.0.1:$API_BASE/v1/customers/$CUSTOMER/recommendations?k=3" || true
  echo
else
  echo "==> curl not found: not calling $FIRST's till API (potluck-agent recommend below does the same)"
fi
STARTED=("${PIDS[@]}")
PIDS=()
for pid in "${STARTED[@]:1}"; do kill "$pid" 2>/dev/null || true; done
for pid in "${STARTED[@]:1}"; do wait "$pid" 2>/dev/null || true; done

REPORT_FLAGS=()
if [ "$LOCAL_ONLY" = true ]; then
  echo "==> training a local-only model at each site, for comparison"
  : > "$OUT/local-only.jsonl"
  for site in "${SITE_IDS[@]}"; do
    "$AGENT" local-only --config "$OUT/sites/$site/agent.toml" --rounds "$ROUNDS" --json >> "$OUT/local-only.jsonl"
  done
  REPORT_FLAGS=(--local-only "$OUT/local-only.jsonl")
fi

echo
echo "==> what $FIRST's till would suggest to customer $CUSTOMER (potluck-agent recommend --explain)"
"$AGENT" recommend --config "$OUT/sites/$FIRST/agent.toml" --customer "$CUSTOMER" --k 3 --explain

echo
"$COORD" report --metrics "$OUT/coordinator/metrics.jsonl" "${REPORT_FLAGS[@]}"
echo
echo "==> the coordinator's model registry, sites and audit log"
"$COORD" model list --config "$OUT/coordinator.toml"
"$COORD" site list --config "$OUT/coordinator.toml"
"$COORD" audit verify --config "$OUT/coordinator.toml"
echo
echo "Everything is in $OUT (metrics: $OUT/coordinator/metrics.jsonl, logs: $OUT/logs/)."
