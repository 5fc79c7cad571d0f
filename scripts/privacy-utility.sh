#!/usr/bin/env bash
# Utility under differential privacy: HR@10 of the federated model after each
# round, for several privacy budgets and without noise, on one synthetic
# franchise (by default 20 sites of 1,000 customers). Each setting is a whole
# demo run (scripts/demo.sh): real coordinator, real agents, loopback QUIC.
set -euo pipefail

usage() {
  cat <<'TXT'
Usage: scripts/privacy-utility.sh [--out DIR] [--sites N] [--customers C] [--rounds R]
                                  [--epsilons "1 2 4 8"] [--server-lr L] [--release]

Prints a Markdown table: one row per round, one column per budget (epsilon at
delta 1e-6 per customer, spent over the whole run) and one without noise.
Runs are kept in DIR (default ./privacy-utility-run).
TXT
}

OUT=./privacy-utility-run
SITES=20
CUSTOMERS=1000
ROUNDS=10
EPSILONS="1 2 4 8"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --sites) SITES="$2"; shift 2 ;;
    --customers) CUSTOMERS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --epsilons) EPSILONS="$2"; shift 2 ;;
    --release) EXTRA+=(--release); shift ;;
    --server-lr) EXTRA+=(--server-lr "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "privacy-utility.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

DEMO="$(cd "$(dirname "$0")" && pwd)/demo.sh"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SETTINGS=()
for e in $EPSILONS; do SETTINGS+=("epsilon-$e"); done
SETTINGS+=("no-noise")

for setting in "${SETTINGS[@]}"; do
  if [ "$setting" = no-noise ]; then flags=(--no-privacy); else flags=(--epsilon "${setting#epsilon-}"); fi
  echo "==> $setting: $SITES sites x $CUSTOMERS customers, $ROUNDS rounds" >&2
  start=$(date +%s)
  "$DEMO" --out "$OUT/$setting" --sites "$SITES" --customers "$CUSTOMERS" --rounds "$ROUNDS" \
    --skip-local-only "${flags[@]}" "${EXTRA[@]}" > "$OUT/$setting.log" 2>&1
  echo "    done in $(( $(date +%s) - start )) s" >&2
done

# One field of every line of a metrics.jsonl.
field() { grep -o "\"$2\":[^,}]*" "$1" | cut -d: -f2; }

header="| round |"; rule="|---:|"
for setting in "${SETTINGS[@]}"; do header+=" $setting HR@10 |"; rule+="---:|"; done
echo "$header"; echo "$rule"
for round in $(seq 1 "$ROUNDS"); do
  row="| $round |"
  for setting in "${SETTINGS[@]}"; do
    metrics="$OUT/$setting/coordinator/metrics.jsonl"
    hr=$(field "$metrics" eval_hr_at_10 | sed -n "${round}p")
    eps=$(field "$metrics" epsilon | sed -n "${round}p")
    if [ "$setting" = no-noise ]; then row+=" $(printf '%.3f' "$hr") |"
    else row+=" $(printf '%.3f (ε %.2f)' "$hr" "$eps") |"; fi
  done
  echo "$row"
done
base=$(field "$OUT/no-noise/coordinator/metrics.jsonl" eval_hr_at_10 | tail -1)
for e in $EPSILONS; do
  hr=$(field "$OUT/epsilon-$e/coordinator/metrics.jsonl" eval_hr_at_10 | tail -1)
  awk -v e="$e" -v hr="$hr" -v base="$base" \
    'BEGIN { printf "epsilon %s: final HR@10 %.3f = %.1f%% of the noiseless %.3f\n", e, hr, 100 * hr / base, base }'
done
