#!/usr/bin/env bash
# Install the Potluck agent as a system service from a site bundle:
# the binary, /etc/potluck (config, certificates, key), the potluck user and
# the systemd unit. Run as root on the site's machine:
#
#   sudo scripts/install-agent.sh --bundle paris-01-bundle [--binary target/release/potluck-agent]
#
# Then import the site's orders and start the service:
#   sudo -u potluck potluck-agent import --config /etc/potluck/agent.toml orders.csv
#   sudo systemctl enable --now potluck-agent
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

BUNDLE=
BINARY=
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE="$2"; shift 2 ;;
    --binary) BINARY="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install-agent.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
[ -n "$BUNDLE" ] || { echo "install-agent.sh: --bundle DIR is required" >&2; exit 2; }
for f in agent.toml site.pem site.key ca.pem; do
  [ -r "$BUNDLE/$f" ] || { echo "install-agent.sh: $BUNDLE/$f is missing or unreadable" >&2; exit 1; }
done
[ "$(id -u)" -eq 0 ] || { echo "install-agent.sh: run as root (sudo)" >&2; exit 1; }
if [ -z "$BINARY" ]; then
  BINARY="$ROOT/target/release/potluck-agent"
  [ -x "$BINARY" ] || cargo build --manifest-path "$ROOT/Cargo.toml" --release -p potluck-agent
fi

id potluck >/dev/null 2>&1 || useradd --system --home-dir /var/lib/potluck --shell /usr/sbin/nologin potluck
install -m 0755 "$BINARY" /usr/local/bin/potluck-agent
install -d -m 0750 -o root -g potluck /etc/potluck
install -m 0640 -o root -g potluck "$BUNDLE/site.pem" "$BUNDLE/ca.pem" /etc/potluck/
install -m 0640 -o root -g potluck "$BUNDLE/site.key" /etc/potluck/site.key
[ -f "$BUNDLE/menu.csv" ] && install -m 0640 -o root -g potluck "$BUNDLE/menu.csv" /etc/potluck/
# State lives where systemd's StateDirectory puts it, not beside the config.
sed 's|^state_dir = .*|state_dir = "/var/lib/potluck"|' "$BUNDLE/agent.toml" > /etc/potluck/agent.toml
chown root:potluck /etc/potluck/agent.toml && chmod 0640 /etc/potluck/agent.toml
install -d -m 0700 -o potluck -g potluck /var/lib/potluck
install -m 0644 "$ROOT/scripts/systemd/potluck-agent.service" /etc/systemd/system/potluck-agent.service
install -d /usr/local/share/doc/potluck && install -m 0644 "$ROOT/README.md" /usr/local/share/doc/potluck/
systemctl daemon-reload
echo "installed; next: import orders as the potluck user, then: systemctl enable --now potluck-agent"
echo "the till's API token is created on first start in /var/lib/potluck/api.token (mode 0600)"
