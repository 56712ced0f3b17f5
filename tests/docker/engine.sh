#!/usr/bin/env bash
# A throw-away Docker engine for the Docker driver's tests, on its own socket and data root so it
# never meets a Docker the machine may already run.
#
#   tests/docker/engine.sh start   install docker.io if needed, start dockerd, build the test image
#   tests/docker/engine.sh env     print the export line the tests read
#   tests/docker/engine.sh stop    stop dockerd (containers die with it), remove its data
#
# The engine runs with no bridge and no iptables (the machine has no network to give containers
# anyway), so the tests' containers use `network = "none"`. The test image is built with
# `docker import` from busybox-static: no registry is needed.
set -euo pipefail

SOCKET=${FLOTILLA_DOCKER_SOCKET:-/tmp/flotilla-docker.sock}
ROOT=${FLOTILLA_DOCKER_ROOT:-/tmp/flotilla-docker}
EXEC_ROOT=${ROOT}-exec
LOG=${ROOT}.log
PIDFILE=${ROOT}.pid
IMAGE=flotilla-test/busybox:latest

docker_cli() { docker -H "unix://$SOCKET" "$@"; }

install() {
    if command -v dockerd >/dev/null && command -v busybox >/dev/null && command -v docker >/dev/null; then
        return
    fi
    echo "engine.sh: installing docker.io and busybox-static" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q docker.io busybox-static >&2
}

running() {
    [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

build_image() {
    if docker_cli image inspect "$IMAGE" >/dev/null 2>&1; then
        return
    fi
    local busybox rootfs
    busybox=$(command -v busybox)
    # Debian's busybox-static ships /bin/busybox; a dynamic busybox would not run in the image.
    [[ -x /bin/busybox ]] && busybox=/bin/busybox
    rootfs=$(mktemp -d)
    mkdir -p "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev"
    cp "$busybox" "$rootfs/bin/busybox"
    for applet in sh sleep true false cat echo hostname ls env; do
        ln -s busybox "$rootfs/bin/$applet"
    done
    echo "root:x:0:0:root:/:/bin/sh" >"$rootfs/etc/passwd"
    tar -C "$rootfs" -c . | docker_cli import \
        --change 'ENV PATH=/bin' \
        --change 'CMD ["/bin/sleep", "infinity"]' \
        - "$IMAGE" >/dev/null
    rm -rf "$rootfs"
    echo "engine.sh: built $IMAGE" >&2
}

start() {
    install
    if running; then
        echo "engine.sh: dockerd already running (pid $(cat "$PIDFILE"))" >&2
    else
        mkdir -p "$ROOT" "$EXEC_ROOT"
        rm -f "$SOCKET"
        # setsid: the daemon outlives this script and the shell that ran it.
        setsid dockerd \
            --host "unix://$SOCKET" \
            --data-root "$ROOT" \
            --exec-root "$EXEC_ROOT" \
            --pidfile "$PIDFILE" \
            --iptables=false --ip6tables=false --bridge=none \
            --storage-driver=vfs \
            >"$LOG" 2>&1 </dev/null &
        local i
        for i in $(seq 1 120); do
            if docker_cli info >/dev/null 2>&1; then
                break
            fi
            if ! kill -0 $! 2>/dev/null; then
                echo "engine.sh: dockerd exited; its log ($LOG):" >&2
                tail -n 30 "$LOG" >&2
                exit 1
            fi
            sleep 0.5
        done
        if ! docker_cli info >/dev/null 2>&1; then
            echo "engine.sh: dockerd did not answer on $SOCKET within 60s; its log ($LOG):" >&2
            tail -n 30 "$LOG" >&2
            exit 1
        fi
        echo "engine.sh: dockerd $(docker_cli version --format '{{.Server.Version}}') on unix://$SOCKET" >&2
    fi
    build_image
    env_line
}

stop() {
    if running; then
        local pid
        pid=$(cat "$PIDFILE")
        kill "$pid"
        for _ in $(seq 1 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "engine.sh: dockerd (pid $pid) did not stop; killing it" >&2
            kill -9 "$pid" || true
        fi
    fi
    rm -f "$SOCKET" "$PIDFILE"
    # Containers' leftover mounts (vfs needs none, but the exec root may hold some) go first.
    if mountpoint -q "$EXEC_ROOT" 2>/dev/null; then umount "$EXEC_ROOT" || true; fi
    grep -F " $ROOT" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount 2>/dev/null || true
    rm -rf "$ROOT" "$EXEC_ROOT"
    echo "engine.sh: stopped" >&2
}

env_line() {
    echo "export FLOTILLA_DOCKER_HOST=unix://$SOCKET"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) env_line ;;
    *)
        echo "usage: $0 start|stop|env" >&2
        exit 2
        ;;
esac
