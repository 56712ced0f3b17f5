#!/usr/bin/env bash
# Scale-up latency with and without a warm pool, on the simulated cloud with realistic latencies
# (a create takes 40 s and the machine then boots for 20 s; a start takes 5 s, then the same
# boot), without cluster-autoscaler: IncreaseSize -> both instances Running, through
# `flotilla ctl`. Prints the cold (two creates) and warm (two starts from the pool) times.
# The end-to-end suite's warm-pool scenario measures the same with the real cluster-autoscaler.
#
#   cargo build --bin flotilla && benches/warm_pool.sh
set -euo pipefail
FLOTILLA=${FLOTILLA:-${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}/debug/flotilla}
DIR=$(mktemp -d)
trap 'kill "$SERVE" 2>/dev/null; rm -rf "$DIR"' EXIT
cat >"$DIR/warm.toml" <<TOML
cluster_name = "bench"
[server]
grpc_listen = "127.0.0.1:18186"
http_listen = "off"
[state]
reconcile_interval = "2s"
[kubernetes]
kubeconfig = "/nonexistent/kubeconfig"   # no cluster here: Node cleanup's calls fail and are logged
[clouds.sim]
driver = "simulated"
node_cleanup = true
create_latency = "40s"
boot_time = "20s"
start_latency = "5s"
state_file = "$DIR/state.json"
[groups.g]
cloud = "sim"
max_size = 4
warm_pool = 2
TOML
ctl() { "$FLOTILLA" ctl --address 127.0.0.1:18186 "$@"; }
running() { ctl refresh >/dev/null 2>&1 || true; [[ $(ctl nodes g | grep -c instanceRunning) -eq $1 ]]; }
seconds_to_running() {
	local t0 n=$1
	t0=$(date +%s.%N)
	ctl increase-size g "$n" >/dev/null
	until running "$n"; do sleep 0.2; done
	echo "$(date +%s.%N) - $t0" | bc
}
stopped() {
	python3 -c 'import json,sys; print(sum(1 for m in json.load(open(sys.argv[1]))["machines"].values() if m.get("stopped")))' \
		"$DIR/state.json"
}
"$FLOTILLA" serve --config "$DIR/warm.toml" >"$DIR/serve.log" 2>&1 &
SERVE=$!
until ctl node-groups >/dev/null 2>&1; do sleep 0.2; done
echo "cold (2 creates): $(seconds_to_running 2) s"
# shellcheck disable=SC2046 # one argument per provider id
ctl delete-nodes g $(ctl nodes g | awk '{print $1}') >/dev/null
until [[ $(stopped) -eq 2 ]]; do sleep 0.2; done
echo "warm (2 starts from the pool): $(seconds_to_running 2) s"
