# shellcheck shell=bash
# Helper predicates are defined inside scenarios and called through wait_for (SC2317);
# REASON and ELAPSED are read by tests/e2e/run (SC2034).
# shellcheck disable=SC2317,SC2034
# The e2e scenarios, for tests/e2e/run (sourced). Each scenario function returns 0 on
# success; on failure it sets REASON and returns 1. Every scenario gets its own directory
# ($SDIR), its own cluster_name (so its Nodes carry their own flotilla.dev/cluster label),
# its own pool label (so its pods fit only its own groups' nodes), its own Flotilla and its
# own cluster-autoscaler; `scenario_cleanup` stops them and removes what is left.

REASON=
FLOTILLA_PID=
CA_PID=
# Other processes a scenario started (a second replica, a proxy), stopped by scenario_cleanup.
EXTRA_PIDS=()

fail() {
	REASON=$*
	return 1
}

# flotilla_config CLUSTER POOL [tls] -> writes the head of $SDIR/flotilla.toml; the caller
# appends clouds and groups. Ports are chosen once per scenario and kept across restarts.
flotilla_config() {
	local cluster=$1 tls=${2:-}
	GRPC_PORT=$(free_port)
	HTTP_PORT=$(free_port)
	cat >"$SDIR/flotilla.toml" <<EOF
cluster_name = "$cluster"

[server]
grpc_listen = "127.0.0.1:$GRPC_PORT"
http_listen = "127.0.0.1:$HTTP_PORT"
shutdown_grace = "5s"

[log]
level = "info,flotilla=debug"

[state]
refresh_timeout = "3s"
max_staleness = "60s"
reconcile_interval = "5s"

[kubernetes]
kubeconfig = "${FLOTILLA_KUBECONFIG:-$RUN_DIR/pki/admin.kubeconfig}"
EOF
	if [[ $tls == tls ]]; then
		cat >>"$SDIR/flotilla.toml" <<EOF

[server.tls]
cert_file = "$RUN_DIR/pki/flotilla.crt"
key_file = "$RUN_DIR/pki/flotilla.key"
client_ca_file = "$RUN_DIR/pki/ca.crt"
EOF
	fi
}

# sim_cloud NAME [EXTRA_TOML_LINES] -> a simulated cloud that registers kwok Nodes.
sim_cloud() {
	cat >>"$SDIR/flotilla.toml" <<EOF

[clouds.$1]
driver = "simulated"
boot_time = "2s"
create_latency = "300ms"
delete_latency = "100ms"
state_file = "$SDIR/$1-state.json"
register_nodes = true
${2:-}
EOF
}

# group NAME CLOUD POOL MAX [EXTRA_TOML_LINES [GROUP_KEYS]] -> a node group of 2-CPU, 4 GiB
# machines; EXTRA_TOML_LINES go after its template table, GROUP_KEYS into the group's own table.
group() {
	cat >>"$SDIR/flotilla.toml" <<EOF

[groups.$1]
cloud = "$2"
min_size = 0
max_size = $4
${6:-}

[groups.$1.template]
cpu = "2"
memory = "4Gi"
pods = 20
labels = { "e2e.flotilla.dev/pool" = "$3" }
${5:-}
EOF
}

ctl_tls_args() { echo --cert "$RUN_DIR/pki/autoscaler.crt" --key "$RUN_DIR/pki/autoscaler.key" --cacert "$RUN_DIR/pki/ca.crt"; }

# ctl ARGS... -> flotilla ctl against this scenario's server (with the client certificate
# when the scenario uses mTLS).
ctl() {
	local extra=()
	[[ -n ${SCENARIO_TLS:-} ]] && read -ra extra <<<"$(ctl_tls_args)"
	"$FLOTILLA" ctl --address "127.0.0.1:$GRPC_PORT" "${extra[@]}" "$@"
}

start_flotilla() {
	"$FLOTILLA" check-config --config "$SDIR/flotilla.toml" >>"$SDIR/flotilla.log" 2>&1 ||
		fail "flotilla check-config rejected $SDIR/flotilla.toml" || return 1
	spawn "$SNAME-flotilla" "$FLOTILLA" serve --config "$SDIR/flotilla.toml"
	FLOTILLA_PID=$SPAWNED_PID
	wait_for 30 "flotilla to answer" ctl node-groups || fail "flotilla did not start (see logs/$SNAME-flotilla.log)"
}

# start_ca VERSION [tls|plain] [EXTRA CA FLAGS...]
start_ca() {
	local version=$1 mode=${2:-plain} bin
	shift 2
	bin=$(ca_bin "$version")/cluster-autoscaler
	[[ -x $bin ]] || fail "cluster-autoscaler $version was not built (see logs/build-ca-$version.log)" || return 1
	{
		echo "address: 127.0.0.1:$GRPC_PORT"
		echo "grpc_timeout: 10s"
		if [[ $mode == tls ]]; then
			echo "cert: $RUN_DIR/pki/autoscaler.crt"
			echo "key: $RUN_DIR/pki/autoscaler.key"
			echo "cacert: $RUN_DIR/pki/ca.crt"
		fi
	} >"$SDIR/cloud-config.yaml"
	# Global scale-down-unneeded-time and max-node-provision-time stay long on purpose:
	# the short ones the scenarios need come from the groups' options (GetOptions). A node
	# that held a pod is "unremovable" until --unremovable-node-recheck-timeout (5m by
	# default) passes, so scale-down would wait 5 minutes without the short recheck.
	spawn "$SNAME-ca" "$bin" \
		--cloud-provider=externalgrpc --cloud-config="$SDIR/cloud-config.yaml" \
		--kubeconfig="$RUN_DIR/pki/admin.kubeconfig" --namespace=kube-system \
		--leader-elect=false --address="127.0.0.1:$(free_port)" \
		--scan-interval=5s --new-pod-scale-up-delay=0s \
		--scale-down-delay-after-add=0s --scale-down-delay-after-delete=0s \
		--scale-down-unneeded-time=10m --max-node-provision-time=15m \
		--unremovable-node-recheck-timeout=5s \
		--v=4 "$@"
	CA_PID=$SPAWNED_PID
}

rpc_count() {
	curl -s "http://127.0.0.1:$HTTP_PORT/metrics" |
		awk -v m="method=\"$1\"" 'index($0, "flotilla_grpc_requests_total{") == 1 && index($0, m) { s += $NF } END { print s + 0 }'
}

# machines CLOUD -> machine names in the simulated cloud's state file, one a line.
machines() {
	[[ -f $SDIR/$1-state.json ]] || return 0
	python3 -c 'import json,sys; [print(k) for k in json.load(open(sys.argv[1]))["machines"]]' "$SDIR/$1-state.json"
}

node_count() { kc get nodes -l "flotilla.dev/cluster=$1" -o name 2>/dev/null | wc -l; }

# workload NAME POOL REPLICAS CPU -> a Deployment whose pods fit only the POOL groups.
workload() {
	cat <<EOF | kc apply -f - >/dev/null
apiVersion: apps/v1
kind: Deployment
metadata: { name: $1, namespace: default }
spec:
  replicas: $3
  selector: { matchLabels: { app: $1 } }
  template:
    metadata: { labels: { app: $1 } }
    spec:
      nodeSelector: { e2e.flotilla.dev/pool: $2 }
      terminationGracePeriodSeconds: 0
      containers:
      - name: main
        image: registry.invalid/pause:never-pulled
        resources: { requests: { cpu: "$4", memory: 256Mi } }
EOF
}

running_pods() {
	kc -n default get pods -l "app=$1" --field-selector=status.phase=Running -o name 2>/dev/null | wc -l
}

all_running() { [[ $(running_pods "$1") -ge $2 ]]; }

scenario_cleanup() {
	local cluster=$1
	kc -n default delete deployment --all --wait=false >/dev/null 2>&1
	[[ -n $CA_PID ]] && stop "$CA_PID"
	[[ -n $FLOTILLA_PID ]] && stop "$FLOTILLA_PID"
	local pid
	for pid in "${EXTRA_PIDS[@]}"; do stop "$pid"; done
	CA_PID='' FLOTILLA_PID='' EXTRA_PIDS=()
	kc -n default delete pods --all --grace-period=0 --force >/dev/null 2>&1
	kc delete nodes -l "flotilla.dev/cluster=$cluster" --wait=false >/dev/null 2>&1
	kc delete nodes -l "e2e.flotilla.dev/scenario=$cluster" --wait=false >/dev/null 2>&1
	kc -n kube-system delete configmap cluster-autoscaler-priority-expander >/dev/null 2>&1
	FLOTILLA_KUBECONFIG=
	return 0
}

# restricted_kubeconfig -> sets FLOTILLA_KUBECONFIG to a kubeconfig for the ServiceAccount
# kube-system/flotilla, which may do exactly what the README's RBAC section grants (plus
# creating Nodes, which only the simulated cloud's kwok registration needs). Made once per run.
restricted_kubeconfig() {
	local path=$RUN_DIR/pki/flotilla-sa.kubeconfig token
	if [[ ! -f $path ]]; then
		cat <<EOF | kc apply -f - >/dev/null || return 1
apiVersion: v1
kind: ServiceAccount
metadata: { name: flotilla, namespace: kube-system }
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: { name: flotilla-nodes }
rules:
# Node cleanup: find the Node of a deleted machine by name or providerID, delete it.
- { apiGroups: [""], resources: [nodes], verbs: [get, list, delete] }
# The simulated cloud's kwok registration only.
- { apiGroups: [""], resources: [nodes], verbs: [create] }
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: { name: flotilla-nodes }
roleRef: { apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: flotilla-nodes }
subjects: [{ kind: ServiceAccount, name: flotilla, namespace: kube-system }]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: { name: flotilla, namespace: kube-system }
rules:
# Leader election.
- { apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get, create, update] }
# The priority expander's ConfigMap: server-side apply is a patch, authorised also as a create
# when the ConfigMap does not exist yet (and create cannot be limited to a name).
- { apiGroups: [""], resources: [configmaps], verbs: [create] }
- { apiGroups: [""], resources: [configmaps], resourceNames: [cluster-autoscaler-priority-expander], verbs: [patch] }
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: { name: flotilla, namespace: kube-system }
roleRef: { apiGroup: rbac.authorization.k8s.io, kind: Role, name: flotilla }
subjects: [{ kind: ServiceAccount, name: flotilla, namespace: kube-system }]
EOF
		token=$(kc -n kube-system create token flotilla --duration=4h) || return 1
		cat >"$path" <<EOF
apiVersion: v1
kind: Config
current-context: flotilla
clusters:
- name: e2e
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $RUN_DIR/pki/ca.crt
users:
- name: flotilla
  user:
    token: $token
contexts:
- name: flotilla
  context: { cluster: e2e, user: flotilla, namespace: kube-system }
EOF
	fi
	FLOTILLA_KUBECONFIG=$path
}

# 1. Scale up from zero: a pending pod -> TemplateNodeInfo, IncreaseSize -> Node -> Running.
scale_up_from_zero() {
	local version=$1 cluster=$2
	flotilla_config "$cluster"
	sim_cloud sim
	group up sim "$cluster" 3 "
[groups.up.options]
scale_down_unneeded_time = \"20s\""
	start_flotilla || return 1
	start_ca "$version" plain || return 1
	local t0=$SECONDS
	workload web "$cluster" 1 500m
	wait_for 120 "the pod to run" all_running web 1 || fail "pod not Running after 120s" || return 1
	ELAPSED=$((SECONDS - t0))
	local node provider
	node=$(kc -n default get pods -l app=web -o jsonpath='{.items[0].spec.nodeName}')
	provider=$(kc get node "$node" -o jsonpath='{.spec.providerID}')
	[[ $provider == "simulated://$cluster/$node" ]] || fail "node $node has providerID $provider" || return 1
	# The Node looks like the group's template: its capacity and labels.
	local shape
	shape=$(kc get node "$node" -o jsonpath='{.status.capacity.cpu}/{.status.capacity.memory}/{.metadata.labels.e2e\.flotilla\.dev/pool}')
	[[ $shape == "2/4Gi/$cluster" ]] || fail "node $node has cpu/memory/pool $shape, expected 2/4Gi/$cluster" || return 1
	[[ $(rpc_count NodeGroupTemplateNodeInfo) -ge 1 ]] || fail "CA never called NodeGroupTemplateNodeInfo" || return 1
	[[ $(rpc_count NodeGroupIncreaseSize) -ge 1 ]] || fail "CA never called NodeGroupIncreaseSize" || return 1
	[[ $(machines sim | wc -l) -eq 1 ]] || fail "expected 1 machine, the cloud has: $(machines sim | xargs)" || return 1
}

# 2. Scale down (continues scenario 1): no workload -> DeleteNodes after the group's 20 s.
scale_down() {
	local cluster=$1
	local t0=$SECONDS
	kc -n default delete deployment web >/dev/null || fail "cannot delete the workload" || return 1
	no_machines() { [[ -z $(machines sim) && $(node_count "$cluster") -eq 0 ]]; }
	wait_for 150 "machine and Node to go" no_machines ||
		fail "after 150s: machines [$(machines sim | xargs)], $(node_count "$cluster") Nodes" || return 1
	ELAPSED=$((SECONDS - t0))
	[[ $(rpc_count NodeGroupDeleteNodes) -ge 1 ]] || fail "CA never called NodeGroupDeleteNodes" || return 1
	[[ $(rpc_count NodeGroupGetOptions) -ge 1 ]] || fail "CA never called NodeGroupGetOptions" || return 1
	# The per-group 20 s, not CA's global 10 m, decided it.
	((ELAPSED < 120)) || fail "scale-down took ${ELAPSED}s: the group's scale_down_unneeded_time was not used" || return 1
}

# 3. Group a's cloud is at quota: CA tries a (priority expander), backs off, scales b.
failed_scale_up_falls_back() {
	local version=$1 cluster=$2
	restricted_kubeconfig || fail "cannot make the restricted ServiceAccount kubeconfig" || return 1
	flotilla_config "$cluster"
	# Flotilla writes cluster-autoscaler's priority expander ConfigMap from the priorities.
	printf '\n[priority_expander]\nnamespace = "kube-system"\n' >>"$SDIR/flotilla.toml"
	sim_cloud full "quota = 0"
	sim_cloud sim
	group a full "$cluster" 3 "" "priority = 50"
	group b sim "$cluster" 3 "" "priority = 10"
	start_flotilla || return 1
	has_priorities() { kc -n kube-system get configmap cluster-autoscaler-priority-expander -o jsonpath='{.data.priorities}' | grep -q '\^a\$'; }
	wait_for 30 "Flotilla to write the priority expander ConfigMap" has_priorities ||
		fail "no priority expander ConfigMap from Flotilla" || return 1
	start_ca "$version" plain --expander=priority || return 1
	local t0=$SECONDS
	workload fallback "$cluster" 1 500m
	wait_for 180 "the pod to run" all_running fallback 1 || fail "pod not Running after 180s" || return 1
	ELAPSED=$((SECONDS - t0))
	local node group
	node=$(kc -n default get pods -l app=fallback -o jsonpath='{.items[0].spec.nodeName}')
	group=$(kc get node "$node" -o jsonpath='{.metadata.labels.flotilla\.dev/group}')
	[[ $group == b ]] || fail "pod runs on node $node of group '$group', expected b" || return 1
	grep -q 'create failed.*group=a\|group=a.*create failed' "$RUN_DIR/logs/$SNAME-flotilla.log" ||
		fail "Flotilla never tried group a (CA did not pick it first)" || return 1
	a_clean() { [[ $(ctl target-size a) == 0 && -z $(ctl nodes a) ]]; }
	wait_for 60 "group a's failed machines to be cleaned up" a_clean ||
		fail "group a not cleaned up: target $(ctl target-size a), instances: $(ctl nodes a | xargs)" || return 1
}

# 4. Machines that never become Nodes are deleted after the group's max_node_provision_time.
never_registered() {
	local version=$1 cluster=$2
	flotilla_config "$cluster"
	sim_cloud sim
	group ghost sim "$cluster" 2 "
[groups.ghost.machine]
register_node = false

[groups.ghost.options]
max_node_provision_time = \"30s\""
	start_flotilla || return 1
	start_ca "$version" plain || return 1
	local t0=$SECONDS
	workload ghost "$cluster" 1 500m
	has_machine() { [[ -n $(machines sim) ]]; }
	wait_for 60 "a machine to be created" has_machine || fail "CA never scaled up the group" || return 1
	local first
	first=$(machines sim | head -1)
	# The scale-up is under way; without the pod CA has no reason to ask for another machine,
	# so whatever is left in the cloud afterwards is a leak.
	kc -n default delete deployment ghost >/dev/null
	gone() { ! machines sim | grep -qx "$first"; }
	wait_for 150 "CA to delete the unregistered machine" gone ||
		fail "machine $first still there after 150s" || return 1
	ELAPSED=$((SECONDS - t0))
	((ELAPSED >= 30)) || fail "machine deleted after ${ELAPSED}s, before max_node_provision_time" || return 1
	((ELAPSED < 120)) || fail "machine deleted after ${ELAPSED}s: the group's max_node_provision_time was not used" || return 1
	[[ $(rpc_count NodeGroupDeleteNodes) -ge 1 || $(rpc_count NodeGroupDecreaseTargetSize) -ge 1 ]] ||
		fail "the machine went without DeleteNodes or DecreaseTargetSize" || return 1
	# Give CA a few loops to leak something if it were going to, then count.
	sleep 15
	[[ -z $(machines sim) ]] || fail "machines leaked: $(machines sim | xargs)" || return 1
	[[ $(ctl target-size ghost) == 0 ]] || fail "target size $(ctl target-size ghost), expected 0" || return 1
	[[ $(node_count "$cluster") -eq 0 ]] || fail "a Node was registered for a register_node = false group" || return 1
}

# 5. mTLS: CA with a client certificate scales up; clients without one are refused.
mtls() {
	local version=$1 cluster=$2
	SCENARIO_TLS=1
	flotilla_config "$cluster" tls
	sim_cloud sim
	group secure sim "$cluster" 2
	start_flotilla || return 1
	local t0=$SECONDS
	if "$FLOTILLA" ctl --address "127.0.0.1:$GRPC_PORT" node-groups >>"$SDIR/ctl-plain.log" 2>&1; then
		fail "flotilla ctl without a client certificate was served"
		return 1
	fi
	local wrong=$SDIR/wrong
	mkdir -p "$wrong"
	openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$wrong/ca.key" -subj /CN=stranger-ca -days 1 \
		-out "$wrong/ca.crt" 2>/dev/null
	openssl req -new -newkey rsa:2048 -nodes -keyout "$wrong/c.key" -subj /CN=stranger -out "$wrong/c.csr" 2>/dev/null
	openssl x509 -req -in "$wrong/c.csr" -CA "$wrong/ca.crt" -CAkey "$wrong/ca.key" -CAcreateserial -days 1 \
		-out "$wrong/c.crt" 2>/dev/null
	if "$FLOTILLA" ctl --address "127.0.0.1:$GRPC_PORT" --cert "$wrong/c.crt" --key "$wrong/c.key" \
		--cacert "$RUN_DIR/pki/ca.crt" node-groups >>"$SDIR/ctl-stranger.log" 2>&1; then
		fail "a client certificate from another CA was accepted"
		return 1
	fi
	start_ca "$version" tls || return 1
	workload secure "$cluster" 1 500m
	wait_for 120 "the pod to run" all_running secure 1 || fail "pod not Running after 120s over mTLS" || return 1
	ELAPSED=$((SECONDS - t0))
	SCENARIO_TLS=
}

# 6. SIGKILL Flotilla in the middle of a scale-up of 5, start it again: CA finishes, and the
# cloud ends with exactly 5 machines and 5 Nodes.
restart_during_scale_up() {
	local version=$1 cluster=$2
	flotilla_config "$cluster"
	sim_cloud sim "create_concurrency = 1"
	# Slow creates, so the kill lands while most of the 5 are still to come.
	sed -i 's/^create_latency = "300ms"/create_latency = "2s"/' "$SDIR/flotilla.toml"
	group r sim "$cluster" 8
	start_flotilla || return 1
	start_ca "$version" plain || return 1
	local t0=$SECONDS
	# 1.5 CPU each on 2-CPU machines: one pod per machine, five machines.
	workload burst "$cluster" 5 1500m
	some_machines() { [[ $(machines sim | wc -l) -ge 1 ]]; }
	wait_for 90 "the first machine" some_machines || fail "CA never scaled up" || return 1
	local before
	before=$(machines sim | wc -l)
	stop "$FLOTILLA_PID" KILL
	log "killed flotilla with $before of 5 machines created"
	((before < 5)) || fail "all 5 machines existed before the kill; the test proves nothing" || return 1
	spawn "$SNAME-flotilla" "$FLOTILLA" serve --config "$SDIR/flotilla.toml"
	FLOTILLA_PID=$SPAWNED_PID
	wait_for 30 "flotilla to answer again" ctl node-groups || fail "flotilla did not restart" || return 1
	wait_for 240 "all 5 pods to run" all_running burst 5 || fail "$(running_pods burst) of 5 pods Running after 240s" || return 1
	ELAPSED=$((SECONDS - t0))
	# Let CA and Flotilla run a few more loops: any duplicate would show up now.
	sleep 15
	local n nodes
	n=$(machines sim | wc -l)
	nodes=$(node_count "$cluster")
	[[ $n -eq 5 ]] || fail "the cloud has $n machines, expected 5: $(machines sim | xargs)" || return 1
	[[ $nodes -eq 5 ]] || fail "$nodes Nodes, expected 5" || return 1
	[[ $(ctl target-size r) == 5 ]] || fail "target size $(ctl target-size r), expected 5" || return 1
}

# 7. Node cleanup: the simulated cloud plays a cluster without a cloud controller manager
# (remove_nodes = false), so only Flotilla's node_cleanup removes the Node of a machine CA
# deleted; a Node of the same providerID scheme that is not Flotilla's stays.
node_cleanup() {
	local version=$1 cluster=$2
	restricted_kubeconfig || fail "cannot make the restricted ServiceAccount kubeconfig" || return 1
	flotilla_config "$cluster"
	sim_cloud sim "remove_nodes = false
node_cleanup = true"
	group clean sim "$cluster" 2 "
[groups.clean.options]
scale_down_unneeded_time = \"20s\""
	# Someone else's Node: kwok keeps it Ready, the taint keeps the workload off it.
	cat <<YAML | kc apply -f - >/dev/null || fail "cannot create the stranger Node" || return 1
apiVersion: v1
kind: Node
metadata:
  name: stranger-$cluster
  labels: { e2e.flotilla.dev/scenario: $cluster }
  annotations: { kwok.x-k8s.io/node: fake }
spec:
  providerID: simulated://someone-else/stranger-$cluster
  taints: [{ key: e2e.flotilla.dev/stranger, effect: NoSchedule }]
YAML
	start_flotilla || return 1
	start_ca "$version" plain || return 1
	workload clean "$cluster" 1 500m
	wait_for 120 "the pod to run" all_running clean 1 || fail "pod not Running after 120s" || return 1
	local node t0
	node=$(kc -n default get pods -l app=clean -o jsonpath='{.items[0].spec.nodeName}')
	t0=$SECONDS
	kc -n default delete deployment clean >/dev/null || fail "cannot delete the workload" || return 1
	no_machine() { [[ -z $(machines sim) ]]; }
	wait_for 150 "CA to delete the machine" no_machine || fail "machine still there: $(machines sim | xargs)" || return 1
	node_gone() { ! kc get node "$node" >/dev/null 2>&1; }
	wait_for 60 "Flotilla to delete the Node $node" node_gone || fail "Node $node still there after its machine went" || return 1
	ELAPSED=$((SECONDS - t0))
	kc get node "stranger-$cluster" >/dev/null 2>&1 || fail "the stranger's Node was deleted" || return 1
	grep -q "deleted the node of a deleted machine" "$RUN_DIR/logs/$SNAME-flotilla.log" ||
		fail "no node cleanup in Flotilla's log" || return 1
	! grep -q "removed node" "$RUN_DIR/logs/$SNAME-flotilla.log" ||
		fail "the simulated cloud removed the Node itself (remove_nodes = false ignored)" || return 1
}

# 8. Burst priorities: Flotilla writes the priority expander's ConfigMap from the groups'
# priorities; CA fills the on-prem group (priority 50) to its max first, then bursts to the
# public cloud group (priority 10).
burst_priorities() {
	local version=$1 cluster=$2
	restricted_kubeconfig || fail "cannot make the restricted ServiceAccount kubeconfig" || return 1
	flotilla_config "$cluster"
	printf '\n[priority_expander]\nnamespace = "kube-system"\n' >>"$SDIR/flotilla.toml"
	sim_cloud onprem
	sim_cloud public
	group onprem onprem "$cluster" 2 "" "priority = 50"
	group public public "$cluster" 5 "" "priority = 10"
	start_flotilla || return 1
	local expected=$'50:\n  - ^onprem$\n10:\n  - ^public$'
	has_priorities() {
		[[ $(kc -n kube-system get configmap cluster-autoscaler-priority-expander -o jsonpath='{.data.priorities}') == "$expected" ]]
	}
	wait_for 30 "Flotilla to write the priority expander ConfigMap" has_priorities ||
		fail "the priority expander ConfigMap is not Flotilla's: $(kc -n kube-system get configmap cluster-autoscaler-priority-expander -o yaml 2>&1)" || return 1
	start_ca "$version" plain --expander=priority || return 1
	local t0=$SECONDS
	# One 1.5-CPU pod per 2-CPU machine: four machines, and on-prem holds two.
	workload burst "$cluster" 4 1500m
	wait_for 180 "all 4 pods to run" all_running burst 4 || fail "$(running_pods burst) of 4 pods Running after 180s" || return 1
	ELAPSED=$((SECONDS - t0))
	local groups
	groups=$(kc -n default get pods -l app=burst -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}' |
		while read -r n; do kc get node "$n" -o jsonpath='{.metadata.labels.flotilla\.dev/group}{"\n"}'; done | sort | uniq -c | xargs)
	[[ $groups == "2 onprem 2 public" ]] || fail "pods per group: $groups, expected 2 onprem 2 public" || return 1
	local first
	first=$(grep -m1 'scaling up' "$RUN_DIR/logs/$SNAME-flotilla.log")
	[[ $first == *group=onprem* ]] || fail "the first scale-up was not on-prem: $first" || return 1
}

# 9. Two replicas with leader election behind one address that routes to the ready one (as a
# Service does); the leader is SIGKILLed in the middle of a scale-up of 5; the other takes
# over, rebuilds its state from the cloud, and CA's scale-up completes with exactly 5
# machines, 5 Nodes and target size 5.
leader_failover() {
	local version=$1 cluster=$2
	restricted_kubeconfig || fail "cannot make the restricted ServiceAccount kubeconfig" || return 1
	flotilla_config "$cluster"
	cat >>"$SDIR/flotilla.toml" <<TOML

[leader_election]
enabled = true
namespace = "kube-system"
lease_duration = "6s"
renew_deadline = "4s"
retry_period = "1s"
TOML
	sim_cloud sim "create_concurrency = 1"
	sed -i 's/^create_latency = "300ms"/create_latency = "2s"/' "$SDIR/flotilla.toml"
	group r sim "$cluster" 8
	local a_grpc=$GRPC_PORT a_http=$HTTP_PORT b_grpc b_http proxy
	b_grpc=$(free_port)
	b_http=$(free_port)
	sed -e "s/127.0.0.1:$a_grpc\"/127.0.0.1:$b_grpc\"/" -e "s/127.0.0.1:$a_http\"/127.0.0.1:$b_http\"/" \
		"$SDIR/flotilla.toml" >"$SDIR/flotilla-b.toml"
	"$FLOTILLA" check-config --config "$SDIR/flotilla.toml" >>"$SDIR/flotilla.log" 2>&1 ||
		fail "flotilla check-config rejected $SDIR/flotilla.toml" || return 1
	spawn "$SNAME-flotilla-a" "$FLOTILLA" serve --config "$SDIR/flotilla.toml"
	local pid_a=$SPAWNED_PID pid_b
	spawn "$SNAME-flotilla-b" "$FLOTILLA" serve --config "$SDIR/flotilla-b.toml"
	pid_b=$SPAWNED_PID
	FLOTILLA_PID=$pid_a
	EXTRA_PIDS=("$pid_b")
	proxy=$(free_port)
	spawn "$SNAME-proxy" python3 "$E2E_DIR/lib/ready-proxy.py" "$proxy" "$a_grpc:$a_http" "$b_grpc:$b_http"
	EXTRA_PIDS+=("$SPAWNED_PID")
	# CA and `ctl` reach whichever replica is ready.
	GRPC_PORT=$proxy
	ready_at() { curl -sf "http://127.0.0.1:$1/readyz" >/dev/null; }
	one_leads() { ready_at "$a_http" || ready_at "$b_http"; }
	wait_for 30 "one replica to lead" one_leads || fail "no replica became ready" || return 1
	if ready_at "$b_http" && ready_at "$a_http"; then fail "both replicas are ready"; return 1; fi
	start_ca "$version" plain || return 1
	local t0=$SECONDS
	workload burst "$cluster" 5 1500m
	some_machines() { [[ $(machines sim | wc -l) -ge 1 ]]; }
	wait_for 90 "the first machine" some_machines || fail "CA never scaled up" || return 1
	local before leader survivor survivor_http
	before=$(machines sim | wc -l)
	if ready_at "$a_http"; then
		leader=$pid_a survivor=b survivor_http=$b_http
	else
		leader=$pid_b survivor=a survivor_http=$a_http
	fi
	local killed_at=$SECONDS
	stop "$leader" KILL
	log "killed the leader with $before of 5 machines created"
	((before < 5)) || fail "all 5 machines existed before the kill; the test proves nothing" || return 1
	wait_for 60 "the other replica to lead" ready_at "$survivor_http" || fail "replica $survivor never took over" || return 1
	TAKEOVER=$((SECONDS - killed_at))
	log "replica $survivor took over ${TAKEOVER}s after the kill"
	FLOTILLA_PID=$([[ $survivor == a ]] && echo "$pid_a" || echo "$pid_b")
	wait_for 240 "all 5 pods to run" all_running burst 5 || fail "$(running_pods burst) of 5 pods Running after 240s" || return 1
	ELAPSED=$((SECONDS - t0))
	# Let CA and Flotilla run a few more loops: any duplicate would show up now.
	sleep 15
	local n nodes
	n=$(machines sim | wc -l)
	nodes=$(node_count "$cluster")
	[[ $n -eq 5 ]] || fail "the cloud has $n machines, expected 5: $(machines sim | xargs)" || return 1
	[[ $nodes -eq 5 ]] || fail "$nodes Nodes, expected 5" || return 1
	[[ $(ctl target-size r) == 5 ]] || fail "target size $(ctl target-size r), expected 5" || return 1
	((TAKEOVER <= 15)) || fail "the takeover took ${TAKEOVER}s" || return 1
	[[ $(grep -c "acquired the lease" "$RUN_DIR/logs/$SNAME-flotilla-$survivor.log") -eq 1 ]] ||
		fail "replica $survivor did not acquire the lease exactly once" || return 1
}

# --- The Helm chart (charts/flotilla) ---

CHART_NS=flotilla-chart

# stub_crds -> CRDs for the kinds the chart may render besides the built-in ones (cert-manager's
# Certificate and Issuer, the Prometheus operator's ServiceMonitor), without their schemas: the
# server accepts the kinds, their fields are not validated.
stub_crds() {
	local spec group kind plural
	for spec in cert-manager.io/Certificate/certificates cert-manager.io/Issuer/issuers \
		monitoring.coreos.com/ServiceMonitor/servicemonitors; do
		IFS=/ read -r group kind plural <<<"$spec"
		cat <<CRD | kc apply -f - >/dev/null || return 1
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: { name: $plural.$group }
spec:
  group: $group
  scope: Namespaced
  names: { kind: $kind, plural: $plural, singular: $(tr '[:upper:]' '[:lower:]' <<<"$kind") }
  versions:
  - name: v1
    served: true
    storage: true
    schema: { openAPIV3Schema: { type: object, x-kubernetes-preserve-unknown-fields: true } }
CRD
	done
	kc wait --for condition=established --timeout=60s crd/certificates.cert-manager.io crd/issuers.cert-manager.io \
		crd/servicemonitors.monitoring.coreos.com >/dev/null
}

# 7. Every example values file rendered by helm and applied to kube-apiserver with
# --dry-run=server, and the variants tests/chart/run rendered (standalone with Secrets, without
# CA, the RBAC features, raw TOML, the upstream chart with the sidecar snippet, the values
# `flotilla import` printed for each seed) when it ran first.
chart_dry_run() {
	[[ -x $HELM_BIN/helm ]] || fail "helm was not built (see logs/build-helm.log)" || return 1
	local t0=$SECONDS failed=() f name
	kc create namespace autoscaler >/dev/null 2>&1
	stub_crds || fail "cannot create the stub CRDs" || return 1
	for f in "$ROOT"/examples/helm/*.yaml; do
		name=$(basename "$f" .yaml)
		case $name in
		upstream-chart-sidecar) continue ;;
		standalone) "$HELM_BIN/helm" template autoscaler "$ROOT/charts/flotilla" -n autoscaler \
			-f "$ROOT/examples/helm/openstack.yaml" -f "$f" >"$SDIR/$name.yaml" 2>>"$SDIR/helm.log" ;;
		*) "$HELM_BIN/helm" template autoscaler "$ROOT/charts/flotilla" -n autoscaler -f "$f" >"$SDIR/$name.yaml" 2>>"$SDIR/helm.log" ;;
		esac || {
			failed+=("$name (helm template)")
			continue
		}
		kc apply --dry-run=server -f "$SDIR/$name.yaml" >>"$SDIR/dry-run.log" 2>&1 || failed+=("$name")
	done
	for f in "$ROOT"/target/chart/*.yaml; do
		[[ -f $f ]] || continue
		kc apply --dry-run=server -f "$f" >>"$SDIR/dry-run.log" 2>&1 || failed+=("target/chart/$(basename "$f")")
	done
	ELAPSED=$((SECONDS - t0))
	((${#failed[@]} == 0)) || fail "kube-apiserver refused: ${failed[*]} (see $SDIR/dry-run.log)"
}

# 8. The chart's sidecar pod, run for real. cluster-autoscaler's command and cloud-config and
# Flotilla's command and configuration come from `helm template` (examples/helm/simulated.yaml,
# plus ports, cluster name and group shape for this run) as kube-apiserver accepted them; the
# release's ConfigMaps, ServiceAccount and RBAC are created in the cluster, the pod's volumes are
# materialised from the API (tests/e2e/lib/podspec.py), and cluster-autoscaler runs with a token
# of the chart's service account, so the chart's RBAC is all it has. A scale-up from zero must
# work.
helm_sidecar() {
	local version=$1 cluster=$2
	[[ -x $HELM_BIN/helm ]] || fail "helm was not built (see logs/build-helm.log)" || return 1
	local ns=$CHART_NS
	GRPC_PORT=$(free_port)
	HTTP_PORT=$(free_port)
	cat >"$SDIR/e2e.values.yaml" <<VALUES
flotilla:
  grpcPort: $GRPC_PORT
  httpPort: $HTTP_PORT
  config:
    cluster_name: $cluster
    clouds:
      sim:
        boot_time: 2s
        create_latency: 300ms
        state_file: /var/lib/flotilla/sim-state.json
    groups:
      workers:
        max_size: 3
        priority: 10
        template:
          cpu: "2"
          memory: 4Gi
          pods: 20
          labels: { e2e.flotilla.dev/pool: $cluster }
  # The simulated cloud's state file, in a volume of the pod.
  extraVolumes: [{ name: state, emptyDir: {} }]
  extraVolumeMounts: [{ name: state, mountPath: /var/lib/flotilla }]
  # The features that talk to the API, with the RBAC the chart grants for them.
  nodeCleanup: { enabled: true }
  priorityExpander: { enabled: true }
autoscaler:
  extraArgs:
    expander: priority
    scan-interval: 5s
    new-pod-scale-up-delay: 0s
    max-node-provision-time: 5m
VALUES
	kc create namespace "$ns" >/dev/null 2>&1
	# Self-contained (certificates embedded), as a kubeconfig in a Secret must be: the pod cannot
	# read the run's files, and paths under the pod's own mounts (/tmp) would be rewritten.
	kc config view --flatten --minify >"$SDIR/flotilla.kubeconfig" || fail "cannot flatten the kubeconfig" || return 1
	kc -n "$ns" create secret generic flotilla-kubeconfig --from-file=kubeconfig="$SDIR/flotilla.kubeconfig" \
		>/dev/null || fail "cannot create the kubeconfig Secret" || return 1
	"$HELM_BIN/helm" template e2e "$ROOT/charts/flotilla" -n "$ns" \
		-f "$ROOT/examples/helm/simulated.yaml" -f "$SDIR/e2e.values.yaml" >"$SDIR/chart.yaml" 2>"$SDIR/helm.log" ||
		fail "helm template failed: $(head -3 "$SDIR/helm.log")" || return 1
	# Everything but the Deployment for real (its pod would be a pending pod CA scales up for).
	python3 -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
yaml.safe_dump_all([d for d in docs if d["kind"] != "Deployment"], open(sys.argv[2], "w"))
deps = [d for d in docs if d["kind"] == "Deployment"]
assert len(deps) == 1, f"{len(deps)} Deployments in sidecar mode"
yaml.safe_dump(deps[0], open(sys.argv[3], "w"))
' "$SDIR/chart.yaml" "$SDIR/objects.yaml" "$SDIR/deployment.yaml" 2>>"$SDIR/helm.log" ||
		fail "cannot split the rendered chart (see $SDIR/helm.log)" || return 1
	kc apply -f "$SDIR/objects.yaml" >"$SDIR/apply.log" 2>&1 ||
		fail "kube-apiserver refused the release: $(tail -2 "$SDIR/apply.log")" || return 1
	kc apply --dry-run=server -o json -f "$SDIR/deployment.yaml" >"$SDIR/deployment.json" 2>>"$SDIR/apply.log" ||
		fail "kube-apiserver refused the Deployment: $(tail -2 "$SDIR/apply.log")" || return 1
	kc -n "$ns" get configmaps,secrets -o json >"$SDIR/volumes.json" || fail "cannot read the release's ConfigMaps" || return 1
	python3 "$E2E_DIR/lib/podspec.py" "$SDIR/deployment.json" "$SDIR/volumes.json" "$SDIR/pod" "$SDIR/pod.sh" \
		2>>"$SDIR/helm.log" || fail "cannot materialise the pod (see $SDIR/helm.log)" || return 1
	local cmd_flotilla=() env_flotilla=() cmd_cluster_autoscaler=() env_cluster_autoscaler=()
	# shellcheck source=/dev/null
	source "$SDIR/pod.sh"
	[[ ${cmd_flotilla[0]:-} == serve ]] || fail "Flotilla's container runs '${cmd_flotilla[*]}', expected serve ..." || return 1
	[[ ${cmd_cluster_autoscaler[0]:-} == ./cluster-autoscaler ]] ||
		fail "CA's container runs '${cmd_cluster_autoscaler[0]:-}'" || return 1

	# A kubeconfig with a token of the pod's service account, for CA.
	local sa token
	sa=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["spec"]["template"]["spec"]["serviceAccountName"])' \
		"$SDIR/deployment.json")
	token=$(kc -n "$ns" create token "$sa" --duration=2h) || fail "cannot get a token for $sa" || return 1
	cat >"$SDIR/ca.kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
current-context: sa
clusters: [{ name: e2e, cluster: { server: "https://127.0.0.1:$APISERVER_PORT", certificate-authority: "$RUN_DIR/pki/ca.crt" } }]
users: [{ name: sa, user: { token: "$token" } }]
contexts: [{ name: sa, context: { cluster: e2e, user: sa, namespace: $ns } }]
KUBECONFIG

	"$FLOTILLA" check-config --config "$SDIR/pod/etc/flotilla/flotilla.toml" >>"$SDIR/flotilla.log" 2>&1 ||
		fail "flotilla check-config rejected the rendered configuration (see $SDIR/flotilla.log)" || return 1
	spawn "$SNAME-flotilla" env "${env_flotilla[@]}" "$FLOTILLA" "${cmd_flotilla[@]}"
	FLOTILLA_PID=$SPAWNED_PID
	wait_for 30 "flotilla to answer" ctl node-groups || fail "flotilla did not start (see logs/$SNAME-flotilla.log)" || return 1
	# HTTP on every address (the pod IP, for probes and Prometheus), gRPC on loopback only.
	local listen
	listen=$(ss -ltnH 2>/dev/null | awk '{print $4}')
	grep -qx "0.0.0.0:$HTTP_PORT" <<<"$listen" || fail "HTTP does not listen on 0.0.0.0:$HTTP_PORT" || return 1
	grep -qx "127.0.0.1:$GRPC_PORT" <<<"$listen" || fail "gRPC does not listen on 127.0.0.1:$GRPC_PORT only" || return 1
	wait_for 30 "/readyz" curl -sf "http://127.0.0.1:$HTTP_PORT/readyz" || fail "Flotilla not ready" || return 1

	local bin
	bin=$(ca_bin "$version")/cluster-autoscaler
	spawn "$SNAME-ca" env "${env_cluster_autoscaler[@]}" "$bin" "${cmd_cluster_autoscaler[@]:1}" \
		--kubeconfig="$SDIR/ca.kubeconfig" --address="127.0.0.1:$(free_port)"
	CA_PID=$SPAWNED_PID
	local t0=$SECONDS
	workload web "$cluster" 1 500m
	wait_for 120 "the pod to run" all_running web 1 || fail "pod not Running after 120s" || return 1
	ELAPSED=$((SECONDS - t0))
	local node provider
	node=$(kc -n default get pods -l app=web -o jsonpath='{.items[0].spec.nodeName}')
	provider=$(kc get node "$node" -o jsonpath='{.spec.providerID}')
	[[ $provider == "simulated://$cluster/$node" ]] || fail "node $node has providerID $provider" || return 1
	[[ $(rpc_count NodeGroupIncreaseSize) -ge 1 ]] || fail "CA never called NodeGroupIncreaseSize" || return 1
	[[ -s $SDIR/pod/var/lib/flotilla/sim-state.json ]] || fail "the state file is not in the pod's volume" || return 1
	# The chart's RBAC was enough: the API never refused cluster-autoscaler.
	local refused
	refused=$(grep -c 'is forbidden' "$RUN_DIR/logs/$SNAME-ca.log")
	((refused == 0)) ||
		fail "the API refused cluster-autoscaler $refused times: $(grep -m1 'is forbidden' "$RUN_DIR/logs/$SNAME-ca.log" | cut -c1-300)" ||
		return 1
	kc -n "$ns" get lease cluster-autoscaler >/dev/null 2>&1 || fail "CA did not take its leader-election Lease" || return 1
	# flotilla.priorityExpander: Flotilla wrote CA's ConfigMap in the release namespace, and CA
	# (which read it with the chart's Role, or the check above would have failed) chose by it.
	local priorities
	priorities=$(kc -n "$ns" get configmap cluster-autoscaler-priority-expander -o jsonpath='{.data.priorities}' 2>/dev/null)
	grep -q '\^workers\$' <<<"$priorities" ||
		fail "no priority-expander ConfigMap with ^workers$ in $ns: '$priorities'" || return 1
	# Here Flotilla uses the run's admin kubeconfig (the simulated cloud registers kwok Nodes), so
	# ask kube-apiserver whether the chart's service account may make each call Flotilla makes.
	local can who="system:serviceaccount:$ns:$sa"
	for can in "get nodes" "list nodes" "delete nodes" "create configmaps -n $ns" \
		"patch configmaps/cluster-autoscaler-priority-expander -n $ns"; do
		# shellcheck disable=SC2086
		[[ $(kc auth can-i $can --as="$who" 2>/dev/null) == yes ]] ||
			fail "the chart's RBAC does not let $who $can" || return 1
	done
}

helm_cleanup() {
	scenario_cleanup "$1"
	kc delete namespace "$CHART_NS" autoscaler --wait=false >/dev/null 2>&1
	kc delete clusterrole,clusterrolebinding -l app.kubernetes.io/name=flotilla >/dev/null 2>&1
	return 0
}

# 10. Warm pool: realistic latencies (a create takes 40 s and the machine boots for 20 s; a
# start takes 5 s, then the same boot). Two pods are scheduled from zero (the pool is empty),
# CA scales the group down, the machines are stopped into the pool and their Nodes removed;
# two pods again: the pool machines are started (no create) and the pods run much sooner.
# WARM_POOL_COLD and WARM_POOL_WARM are pending pod -> Running, in seconds.
warm_pool() {
	local version=$1 cluster=$2
	restricted_kubeconfig || fail "cannot make the restricted ServiceAccount kubeconfig" || return 1
	flotilla_config "$cluster"
	sim_cloud sim "remove_nodes = false
node_cleanup = true
start_latency = \"5s\""
	sed -i -e 's/^create_latency = "300ms"/create_latency = "40s"/' -e 's/^boot_time = "2s"/boot_time = "20s"/' \
		"$SDIR/flotilla.toml"
	group warm sim "$cluster" 4 "
[groups.warm.options]
scale_down_unneeded_time = \"20s\"" "warm_pool = 2"
	start_flotilla || return 1
	start_ca "$version" plain || return 1
	pod_to_running() { # NAME -> seconds from the Deployment to 2 Running pods
		local t0=$SECONDS
		workload "$1" "$cluster" 2 1500m
		wait_for 240 "2 pods of $1 to run" all_running "$1" 2 || return 1
		echo $((SECONDS - t0))
	}
	WARM_POOL_COLD=$(pod_to_running cold) || fail "cold: $(running_pods cold) of 2 pods Running after 240s" || return 1
	log "cold scale-up (two creates): ${WARM_POOL_COLD}s"
	kc -n default delete deployment cold >/dev/null || fail "cannot delete the workload" || return 1
	stopped_count() {
		python3 -c 'import json,sys; print(sum(1 for m in json.load(open(sys.argv[1]))["machines"].values() if m.get("stopped")))' \
			"$SDIR/sim-state.json"
	}
	pool_full() { [[ $(stopped_count) -eq 2 && $(node_count "$cluster") -eq 0 ]]; }
	wait_for 180 "both machines to be stopped into the pool and their Nodes removed" pool_full ||
		fail "after scale-down: $(stopped_count) stopped, $(node_count "$cluster") Nodes, machines $(machines sim | xargs)" || return 1
	[[ $(ctl target-size warm) == 0 ]] || fail "target size $(ctl target-size warm) with only stopped machines" || return 1
	[[ -z $(ctl nodes warm) ]] || fail "stopped machines reported to CA: $(ctl nodes warm | xargs)" || return 1
	WARM_POOL_WARM=$(pod_to_running warm) || fail "warm: $(running_pods warm) of 2 pods Running after 240s" || return 1
	log "warm scale-up (two starts from the pool): ${WARM_POOL_WARM}s"
	ELAPSED=$WARM_POOL_WARM
	[[ $(machines sim | wc -l) -eq 2 ]] || fail "the cloud has $(machines sim | wc -l) machines, expected the same 2" || return 1
	grep -q 'started pool machine' "$RUN_DIR/logs/$SNAME-flotilla.log" || fail "no pool machine was started" || return 1
	((WARM_POOL_WARM < WARM_POOL_COLD)) || fail "warm ${WARM_POOL_WARM}s is not faster than cold ${WARM_POOL_COLD}s" || return 1
	echo "warm-pool: cold ${WARM_POOL_COLD}s, warm ${WARM_POOL_WARM}s" >>"$RUN_DIR/figures.txt"
}
