#!/usr/bin/env bash
# The utility benchmark: is the federated model worth having? Runs the
# synthetic franchise of 20 sites x 1,000 customers (seed 7) without noise
# (scripts/experiments/utility.toml) and under customer-level DP at several
# budgets (utility-dp.toml), all scored on the same held-out orders, and
# prints one table: HR@10 and NDCG@10 (whole orders, repeat and new items)
# of each model and baseline, with the gain over the initial model and over
# GP-TopFreq, the strongest simple baseline.
#   scripts/utility-bench.sh [--out DIR] [--only-noiseless]
# About 15 minutes on 2 cores (release build). Needs python3 for the table.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT=./utility-bench
DP=true
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --only-noiseless) DP=false; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "utility-bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
SIM=("$ROOT/scripts/simulate" --release)
"${SIM[@]}" "$ROOT/scripts/experiments/utility.toml" --out "$OUT/noiseless" --quiet >/dev/null
RUNS=("$OUT/noiseless/summary.json")
if [ "$DP" = true ]; then
  "${SIM[@]}" "$ROOT/scripts/experiments/utility-dp.toml" --out "$OUT/private" --quiet >/dev/null
  while IFS= read -r s; do RUNS+=("$s"); done < <(ls "$OUT"/private/*/summary.json | sort -t= -k2 -g)
fi
python3 - "${RUNS[@]}" <<'PY'
import json, sys

runs = [json.load(open(p)) for p in sys.argv[1:]]
base = runs[0]["baselines"]
gp = base["personal"]
initial = base["initial"]


def f(v):
    return "  -   " if v is None else f"{v:.4f}"


def row(name, s, start=initial):
    print(f"{name:<32} {f(s['hr_at_10'])}  {f(s['ndcg_at_10'])}  {f(s.get('repeat_hr_at_10'))}  "
          f"{f(s.get('new_hr_at_10'))}  {s['hr_at_10'] - gp['hr_at_10']:+.4f}  "
          f"{s['ndcg_at_10'] / gp['ndcg_at_10']:.3f}   {s['hr_at_10'] - start['hr_at_10']:+.4f}")


print(f"{'model (last round)':<32} HR@10   NDCG@10 repeat  new     vs GP    NDCG/GP vs initial")
names = {"personal": "gp-topfreq (baseline)", "popularity": "site popularity",
         "initial": "initial model", "local_only": "local-only (each site)",
         "centralised": "centralised (pooled)"}
for key, name in names.items():
    if key in base:
        row(name, base[key])
for r in runs:
    budget = r["config"]["coordinator"].get("privacy", {})
    start = r["baselines"]["initial"]
    if r.get("epsilon") is None:
        label = "federated, no DP"
    else:
        if r is runs[1]:
            row("initial model, private prior", start)
        label = f"federated, eps {budget['target_epsilon']:g} (spent {r['epsilon']:.2f})"
    row(label, r["last"], start)
if "centralised" in base:
    ratio = runs[0]["last"]["hr_at_10"] / base["centralised"]["hr_at_10"]
    print(f"noiseless federated / centralised HR@10: {ratio:.3f}")
PY
