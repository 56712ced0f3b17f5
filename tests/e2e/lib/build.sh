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
# and Kubernetes must be built with Go 1.26.x, see docs/e2e.md).
export GOTOOLCHAIN=local
export GOFLAGS=-mod=mod
export CGO_ENABLED=0

KUBE_VERSION=v1.36.3
KWOK_VERSION=v0.8.0
KUBE_BIN=$E2E_CACHE/bin/kube-$KUBE_VERSION
KWOK_BIN=$E2E_CACHE/bin/kwok-$KWOK_VERSION

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

# build_ca VERSION
#
# Default source: the Go module proxy, through the harness module tests/e2e/ca-VERSION.
# If FLOTILLA_E2E_AUTOSCALER_GIT names a git directory of kubernetes/autoscaler (a
# local clone), the tag cluster-autoscaler-VERSION is exported from it and the harness
# module is pointed at that source with two more replace directives; everything else
# (the pinned Kubernetes modules, the other dependencies) still comes from the proxy.
build_ca() {
	local version=$1 bin
	bin=$(ca_bin "$version")
	[[ -x $bin/cluster-autoscaler ]] && return 0
	local work
	work=$(copy_module "ca-$version") || return 1
	if [[ -n ${FLOTILLA_E2E_AUTOSCALER_GIT:-} ]]; then
		local src=$E2E_CACHE/src/autoscaler-$version
		if [[ ! -f $src/cluster-autoscaler/go.mod ]]; then
			rm -rf "$src" && mkdir -p "$src"
			local git=(git --git-dir="$FLOTILLA_E2E_AUTOSCALER_GIT") tag=cluster-autoscaler-$version excludes=()
			# A partial clone may lack some blobs (huge generated files of other cloud
			# providers, never compiled with -tags externalgrpc): leave those files out.
			mapfile -t excludes < <("${git[@]}" ls-tree -r "$tag" -- cluster-autoscaler |
				awk '{ print $3 " " $4 }' | "${git[@]}" cat-file --batch-check='%(objectname) %(rest)' |
				awk '$2 == "missing" { print $1 }' | while read -r sha; do
					"${git[@]}" ls-tree -r "$tag" -- cluster-autoscaler | awk -v s="$sha" '$3 == s { print ":(exclude)" $4 }'
				done)
			"${git[@]}" archive "$tag" -- cluster-autoscaler "${excludes[@]}" | tar -x -C "$src" || return 1
		fi
		(cd "$work" && go mod edit \
			-replace "k8s.io/autoscaler/cluster-autoscaler=$src/cluster-autoscaler" \
			-replace "k8s.io/autoscaler/cluster-autoscaler/apis=$src/cluster-autoscaler/apis") || return 1
	fi
	mkdir -p "$bin.tmp"
	(cd "$work" && go build -tags externalgrpc -o "$bin.tmp/cluster-autoscaler" k8s.io/autoscaler/cluster-autoscaler) || return 1
	rm -rf "$bin" && mv "$bin.tmp" "$bin"
}
