# shellcheck shell=bash
# Builds (or reuses) the Go components of the e2e suite. Sourced by tests/e2e/run.
#
# Everything lives under $E2E_CACHE (default ~/.cache/flotilla-e2e): the Go module
# cache, the Go build cache, and the binaries, keyed by version, so a second run
# finds them and starts in seconds.

E2E_DIR=${E2E_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
E2E_CACHE=${E2E_CACHE:-$HOME/.cache/flotilla-e2e}
export GOMODCACHE=${GOMODCACHE_E2E:-$E2E_CACHE/gomod}
export GOCACHE=${GOCACHE_E2E:-$E2E_CACHE/gobuild}
# Build with the installed Go; never download a toolchain (only registries are reachable,
# and Kubernetes must be built with Go 1.26.x, see the README, "End to end").
export GOTOOLCHAIN=local
export GOFLAGS=-mod=mod
export CGO_ENABLED=0

KUBE_VERSION=v1.36.3
KWOK_VERSION=v0.8.0
KUBE_BIN=$E2E_CACHE/bin/kube-$KUBE_VERSION
KWOK_BIN=$E2E_CACHE/bin/kwok-$KWOK_VERSION
HELM_VERSION=v3.22.0
HELM_BIN=$E2E_CACHE/bin/helm-$HELM_VERSION

# ca_bin VERSION -> directory holding that CA build.
ca_bin() { echo "$E2E_CACHE/bin/cluster-autoscaler-$1"; }

# copy_module NAME -> a scratch copy of tests/e2e/NAME, so builds never edit the work tree.
copy_module() {
	local work=$E2E_CACHE/work/$1
	rm -rf "$work" && mkdir -p "$work" && cp -r "$E2E_DIR/$1/." "$work/"
	echo "$work"
}

build_kube() {
	if [[ -x $KUBE_BIN/kube-apiserver && -x $KUBE_BIN/kube-scheduler && -x $KUBE_BIN/kube-controller-manager && -x $KUBE_BIN/etcd && -x $KUBE_BIN/kubectl ]]; then
		return 0
	fi
	local work
	work=$(copy_module kube) || return 1
	mkdir -p "$KUBE_BIN.tmp"
	(cd "$work" && go build -o "$KUBE_BIN.tmp/" \
		k8s.io/kubernetes/cmd/kube-apiserver \
		k8s.io/kubernetes/cmd/kube-scheduler \
		k8s.io/kubernetes/cmd/kube-controller-manager \
		k8s.io/kubernetes/cmd/kubectl \
		./etcd) || return 1
	rm -rf "$KUBE_BIN" && mv "$KUBE_BIN.tmp" "$KUBE_BIN"
}

build_kwok() {
	[[ -x $KWOK_BIN/kwok ]] && return 0
	local work
	work=$(copy_module kwok) || return 1
	mkdir -p "$KWOK_BIN.tmp"
	(cd "$work" && go build -o "$KWOK_BIN.tmp/kwok" sigs.k8s.io/kwok/cmd/kwok) || return 1
	rm -rf "$KWOK_BIN" && mv "$KWOK_BIN.tmp" "$KWOK_BIN"
}

# helm, for the chart checks (tests/chart/run) and the chart scenario. The version variables
# and the Kubernetes version `helm template` assumes are set as helm's own Makefile sets them.
build_helm() {
	[[ -x $HELM_BIN/helm ]] && return 0
	local work pkg=helm.sh/helm/v3
	work=$(copy_module helm) || return 1
	mkdir -p "$HELM_BIN.tmp"
	(cd "$work" && go build -trimpath -o "$HELM_BIN.tmp/helm" -ldflags "-s -w \
		-X $pkg/internal/version.version=$HELM_VERSION -X $pkg/internal/version.gitTreeState=clean \
		-X $pkg/pkg/lint/rules.k8sVersionMajor=1 -X $pkg/pkg/lint/rules.k8sVersionMinor=36 \
		-X $pkg/pkg/chartutil.k8sVersionMajor=1 -X $pkg/pkg/chartutil.k8sVersionMinor=36" \
		$pkg/cmd/helm) || return 1
	rm -rf "$HELM_BIN" && mv "$HELM_BIN.tmp" "$HELM_BIN"
}

# ca_source_reachable VERSION -> whether the Go module proxy serves the CA version the harness
# module pins (some proxies refuse k8s.io/autoscaler/cluster-autoscaler).
ca_source_reachable() {
	local work module
	work=$(copy_module "ca-$1") || return 1
	module=$(cd "$work" && go list -m -f '{{.Path}}@{{.Version}}' k8s.io/autoscaler/cluster-autoscaler 2>/dev/null) || true
	[[ -n $module ]] || module=$(awk '$1 == "k8s.io/autoscaler/cluster-autoscaler" { print $1 "@" $2; exit }' "$work/go.mod")
	(cd "$work" && go mod download "$module") >/dev/null 2>&1
}

# build_ca VERSION: from the Go module proxy, through the harness module tests/e2e/ca-VERSION.
# A binary already in the cache is used as it is.
build_ca() {
	local version=$1 bin
	bin=$(ca_bin "$version")
	[[ -x $bin/cluster-autoscaler ]] && return 0
	local work
	work=$(copy_module "ca-$version") || return 1
	mkdir -p "$bin.tmp"
	(cd "$work" && go build -tags externalgrpc -o "$bin.tmp/cluster-autoscaler" k8s.io/autoscaler/cluster-autoscaler) || return 1
	rm -rf "$bin" && mv "$bin.tmp" "$bin"
}
