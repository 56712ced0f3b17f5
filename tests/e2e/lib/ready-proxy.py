#!/usr/bin/env python3
"""A TCP proxy that sends each new connection to a backend whose /readyz answers 200.

What a Kubernetes Service does for the pods of a Deployment with a readiness probe, for the
leader-election scenario: cluster-autoscaler connects to this one address and reaches
whichever Flotilla replica leads (the follower is not ready). A connection to a backend that
dies is closed; the client reconnects and is sent to the replica that is ready then.

    ready-proxy.py LISTEN_PORT GRPC_PORT:HTTP_PORT [GRPC_PORT:HTTP_PORT ...]
"""
import socket
import sys
import threading
import urllib.request


def ready(http_port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1) as r:
            return r.status == 200
    except Exception:
        return False


def pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def serve(client, backends):
    for grpc_port, http_port in backends:
        if ready(http_port):
            try:
                upstream = socket.create_connection(("127.0.0.1", grpc_port), timeout=2)
            except OSError:
                continue
            upstream.settimeout(None)
            print(f"connection -> 127.0.0.1:{grpc_port}", flush=True)
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
            return
    print("connection refused: no ready backend", flush=True)
    client.close()


def main():
    listen_port = int(sys.argv[1])
    backends = [tuple(int(p) for p in arg.split(":")) for arg in sys.argv[2:]]
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(64)
    while True:
        client, _ = server.accept()
        threading.Thread(target=serve, args=(client, backends), daemon=True).start()


if __name__ == "__main__":
    main()
