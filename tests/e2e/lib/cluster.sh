# shellcheck shell=bash
# A throw-away Kubernetes control plane on 127.0.0.1, for tests/e2e/run (sourced).
#
# etcd, kube-apiserver, kube-scheduler, kube-controller-manager and kwok (playing the
# kubelet of every Node annotated kwok.x-k8s.io/node=fake). Certificates, kubeconfigs and
# kwok stages are made per run under $RUN_DIR; every process is started through `spawn`,
# which records its pid so `stop_all` (the EXIT trap) stops it.

PIDS=()

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# free_port -> a TCP port nothing listens on now.
free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# spawn NAME CMD... -> starts CMD in the background, output in $RUN_DIR/logs/NAME.log;
# sets SPAWNED_PID.
spawn() {
	local name=$1
	shift
	"$@" >>"$RUN_DIR/logs/$name.log" 2>&1 &
	SPAWNED_PID=$!
	PIDS+=("$SPAWNED_PID")
	echo "$SPAWNED_PID" >"$RUN_DIR/pids/$name"
}

# stop PID [SIGNAL] -> signals one process we started and waits for it (at most 20 s).
stop() {
	local pid=$1 sig=${2:-TERM} i
	kill -0 "$pid" 2>/dev/null || return 0
	kill "-$sig" "$pid" 2>/dev/null
	for ((i = 0; i < 100; i++)); do
		kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
		sleep 0.2
	done
	kill -KILL "$pid" 2>/dev/null
	wait "$pid" 2>/dev/null
	return 0
}

stop_all() {
	local i
	for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
		stop "${PIDS[i]}"
	done
	PIDS=()
}

# wait_for SECONDS DESCRIPTION CMD... -> polls CMD every second; 1 on timeout.
wait_for() {
	local limit=$1 what=$2 deadline
	shift 2
	deadline=$((SECONDS + limit))
	while ((SECONDS < deadline)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 1
	done
	log "timed out after ${limit}s waiting for $what"
	return 1
}

kc() { "$KUBE_BIN/kubectl" --kubeconfig "$RUN_DIR/pki/admin.kubeconfig" "$@"; }

# issue NAME SUBJECT [SAN] -> NAME.key/NAME.crt signed by the run's CA.
issue() {
	local name=$1 subject=$2 san=${3:-} pki=$RUN_DIR/pki
	openssl req -new -newkey rsa:2048 -nodes -keyout "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr" 2>/dev/null || return 1
	{
		echo "basicConstraints=CA:FALSE"
		echo "keyUsage=digitalSignature,keyEncipherment"
		echo "extendedKeyUsage=serverAuth,clientAuth"
		[[ -n $san ]] && echo "subjectAltName=$san"
	} >"$pki/$name.ext"
	openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
		-days 2 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
}

make_pki() {
	local pki=$RUN_DIR/pki
	mkdir -p "$pki"
	openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -subj "/CN=flotilla-e2e-ca" \
		-days 2 -sha256 -out "$pki/ca.crt" 2>/dev/null || return 1
	issue apiserver "/CN=kube-apiserver" "IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc" || return 1
	issue admin "/O=system:masters/CN=e2e-admin" || return 1
	# Flotilla's gRPC server and its clients (cluster-autoscaler, flotilla ctl).
	issue flotilla "/CN=flotilla" "IP:127.0.0.1,DNS:localhost" || return 1
	issue autoscaler "/CN=cluster-autoscaler" || return 1
	openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null || return 1
	openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

write_kubeconfig() {
	cat >"$RUN_DIR/pki/admin.kubeconfig" <<EOF
apiVersion: v1
kind: Config
current-context: e2e
clusters:
- name: e2e
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $RUN_DIR/pki/ca.crt
users:
- name: admin
  user:
    client-certificate: $RUN_DIR/pki/admin.crt
    client-key: $RUN_DIR/pki/admin.key
contexts:
- name: e2e
  context:
    cluster: e2e
    user: admin
EOF
}

# kwok's own stage files, from the module kwok was built from: node "fast" (initialize)
# and heartbeat, pod "fast" (ready, complete, delete).
write_kwok_stages() {
	local stage=$GOMODCACHE/sigs.k8s.io/kwok@$KWOK_VERSION/kustomize/stage f first=1
	: >"$RUN_DIR/kwok-stages.yaml"
	for f in node/fast/node-initialize.yaml node/heartbeat/node-heartbeat.yaml \
		pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
		[[ -f $stage/$f ]] || { log "kwok stage $stage/$f is missing"; return 1; }
		((first)) || echo "---" >>"$RUN_DIR/kwok-stages.yaml"
		first=0
		cat "$stage/$f" >>"$RUN_DIR/kwok-stages.yaml"
	done
}

start_cluster() {
	mkdir -p "$RUN_DIR/logs" "$RUN_DIR/pids" "$RUN_DIR/etcd"
	make_pki || { log "openssl failed"; return 1; }
	local etcd_port peer_port
	etcd_port=$(free_port)
	peer_port=$(free_port)
	APISERVER_PORT=$(free_port)
	write_kubeconfig
	write_kwok_stages || return 1

	spawn etcd "$KUBE_BIN/etcd" --data-dir "$RUN_DIR/etcd" \
		--listen-client-url "http://127.0.0.1:$etcd_port" --listen-peer-url "http://127.0.0.1:$peer_port"
	local pki=$RUN_DIR/pki
	spawn kube-apiserver "$KUBE_BIN/kube-apiserver" \
		--etcd-servers "http://127.0.0.1:$etcd_port" \
		--bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
		--endpoint-reconciler-type none \
		--tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
		--client-ca-file "$pki/ca.crt" \
		--service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
		--service-account-issuer https://kubernetes.default.svc \
		--service-cluster-ip-range 10.96.0.0/24 \
		--authorization-mode RBAC --enable-priority-and-fairness=false
	wait_for 60 "kube-apiserver /readyz" kc get --raw /readyz || return 1

	local sched_port kcm_port
	sched_port=$(free_port)
	kcm_port=$(free_port)
	spawn kube-scheduler "$KUBE_BIN/kube-scheduler" \
		--kubeconfig "$pki/admin.kubeconfig" \
		--authentication-kubeconfig "$pki/admin.kubeconfig" --authorization-kubeconfig "$pki/admin.kubeconfig" \
		--bind-address 127.0.0.1 --secure-port "$sched_port" --cert-dir "$RUN_DIR/scheduler-certs" \
		--leader-elect=false
	spawn kube-controller-manager "$KUBE_BIN/kube-controller-manager" \
		--kubeconfig "$pki/admin.kubeconfig" \
		--authentication-kubeconfig "$pki/admin.kubeconfig" --authorization-kubeconfig "$pki/admin.kubeconfig" \
		--bind-address 127.0.0.1 --secure-port "$kcm_port" --cert-dir "$RUN_DIR/kcm-certs" \
		--leader-elect=false --use-service-account-credentials=false \
		--service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
		--controllers '*,-nodeipam'
	local kwok_port
	kwok_port=$(free_port)
	spawn kwok "$KWOK_BIN/kwok" \
		--kubeconfig "$pki/admin.kubeconfig" \
		--manage-all-nodes=false \
		--manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
		--node-ip 127.0.0.1 \
		--server-address "127.0.0.1:$kwok_port" \
		-c "$RUN_DIR/kwok-stages.yaml"
	wait_for 60 "the default ServiceAccount" kc -n default get serviceaccount default || return 1
	sleep 1
	local name
	for name in etcd kube-apiserver kube-scheduler kube-controller-manager kwok; do
		kill -0 "$(<"$RUN_DIR/pids/$name")" 2>/dev/null || { log "$name exited early (see $RUN_DIR/logs/$name.log)"; return 1; }
	done
	log "control plane up: kube-apiserver on 127.0.0.1:$APISERVER_PORT"
}
