"""Checks one rendering of charts/flotilla (tests/chart/run calls it).

    check.py RENDERED.yaml VALUES.yaml [VALUES.yaml ...]

Reads the manifests `helm template` wrote and the values files they came from, and asserts what
the chart promises: Flotilla's TOML is exactly the values' `flotilla.config` (with node_cleanup
when flotilla.nodeCleanup is on) plus the chart's [server], [leader_election] (more than one
Flotilla) and [priority_expander] (in the release namespace) tables; gRPC on loopback in sidecar mode, HTTP on the pod IP; CA's cloud-config points
at Flotilla; secrets are never values in a ConfigMap; pods are hardened and roll on a config
change; RBAC is granted only behind its values. Prints one line per problem; exits 1 if any.
"""

import sys
import tomllib

import yaml

SECRET_KEYS = {
    "password", "token_secret", "join_token", "k3s_token", "application_credential_secret",
    "token", "api_key", "api_client_id", "api_secret", "client_secret",
}

problems = []


def check(ok, message):
    if not ok:
        problems.append(message)


def merge(base, over):
    """Helm's value coalescing, for plain maps."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        elif v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def normalise(v):
    """YAML and TOML agree on everything the chart writes except integral floats."""
    if isinstance(v, dict):
        return {k: normalise(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [normalise(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def secrets_are_references(table, path=""):
    for k, v in table.items():
        where = f"{path}.{k}" if path else k
        if isinstance(v, dict):
            if k in SECRET_KEYS:
                check(set(v) <= {"env", "file"}, f"{where}: a secret must be {{ env = ... }} or {{ file = ... }}")
            else:
                secrets_are_references(v, where)
        elif k in SECRET_KEYS:
            check(False, f"{where}: a secret is written into the ConfigMap as a value")


def main():
    docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
    values = yaml.safe_load(open("charts/flotilla/values.yaml"))
    for f in sys.argv[2:]:
        values = merge(values, yaml.safe_load(open(f)) or {})
    fl = values["flotilla"]
    standalone = values["mode"] == "standalone"
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    # Flotilla's configuration.
    configmaps = {d["metadata"]["name"]: d for d in by_kind.get("ConfigMap", [])}
    tomls = [d["data"]["flotilla.toml"] for d in configmaps.values() if "flotilla.toml" in d.get("data", {})]
    check(len(tomls) == 1, f"expected one flotilla.toml, found {len(tomls)}")
    config = tomllib.loads(tomls[0])
    namespace = next(iter(configmaps.values()))["metadata"]["namespace"]
    server = config.pop("server", {})
    # The tables the chart owns besides [server]: from its values, for the release namespace.
    replicas = fl["replicas"] if standalone else values["autoscaler"]["replicas"]
    le = fl["leaderElection"]
    want_le = None
    if replicas > 1:
        want_le = {"enabled": True, "namespace": namespace, "lease_name": le["leaseName"]}
        for key, toml_key in (("leaseDuration", "lease_duration"), ("renewDeadline", "renew_deadline"), ("retryPeriod", "retry_period")):
            if le.get(key):
                want_le[toml_key] = le[key]
    got_le = config.pop("leader_election", None)
    check(got_le == want_le, f"[leader_election] is {got_le}, expected {want_le} ({replicas} replicas)")
    want_pe = {"namespace": namespace} if fl["priorityExpander"]["enabled"] else None
    got_pe = config.pop("priority_expander", None)
    check(got_pe == want_pe, f"[priority_expander] is {got_pe}, expected {want_pe}")
    if fl["nodeCleanup"]["enabled"]:
        check(any(c.get("node_cleanup") is True for c in config.get("clouds", {}).values()),
              "flotilla.nodeCleanup.enabled but no cloud has node_cleanup = true")
    if not fl.get("configToml"):
        want = normalise(fl["config"])
        if fl["nodeCleanup"]["enabled"]:
            for cloud in want.get("clouds", {}).values():
                cloud.setdefault("node_cleanup", True)
        check(normalise(config) == want,
              "flotilla.toml is not the values' flotilla.config (with node_cleanup from flotilla.nodeCleanup):\n"
              f"  rendered: {config}\n  values:   {want}")
    def host_port(host, port):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    grpc_host = fl["bindAddress"] if standalone else "127.0.0.1"
    check(server.get("grpc_listen") == host_port(grpc_host, fl["grpcPort"]), f"grpc_listen is {server.get('grpc_listen')}")
    check(server.get("http_listen") == host_port(fl["bindAddress"], fl["httpPort"]), f"http_listen is {server.get('http_listen')}")
    check(("tls" in server) == standalone, f"[server.tls] present={'tls' in server} in mode {values['mode']}")
    secrets_are_references(config)

    # CA's cloud-config.
    ca_enabled = values["autoscaler"]["enabled"]
    clouds = [yaml.safe_load(d["data"]["cloud-config.yaml"]) for d in configmaps.values() if "cloud-config.yaml" in d.get("data", {})]
    check(len(clouds) == (1 if ca_enabled else 0), f"{len(clouds)} cloud-configs")
    if clouds:
        cc = clouds[0]
        if standalone:
            check(cc["address"].endswith(f".svc:{fl['grpcPort']}"), f"cloud-config address {cc['address']}")
            check({"cert", "key", "cacert"} <= set(cc), "standalone cloud-config lacks cert/key/cacert")
        else:
            check(cc["address"] == f"127.0.0.1:{fl['grpcPort']}", f"cloud-config address {cc['address']}")
            check("cert" not in cc, "sidecar cloud-config uses TLS")

    # Pods.
    flotilla_containers = 0
    for dep in by_kind.get("Deployment", []):
        pod = dep["spec"]["template"]
        name = dep["metadata"]["name"]
        check("checksum/config" in pod["metadata"].get("annotations", {}), f"{name}: no checksum/config annotation")
        sec = pod["spec"].get("securityContext", {})
        check(sec.get("runAsNonRoot") is True, f"{name}: pod not runAsNonRoot")
        mounts_by_volume = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        for c in pod["spec"]["containers"]:
            csec = c.get("securityContext", {})
            check(csec.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']}: root filesystem writable")
            check(csec.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}: privilege escalation allowed")
            check("ALL" in csec.get("capabilities", {}).get("drop", []), f"{name}/{c['name']}: capabilities not dropped")
            for m in c.get("volumeMounts", []):
                check(m["name"] in mounts_by_volume, f"{name}/{c['name']}: mount {m['name']} has no volume")
            if c["name"] == "flotilla":
                flotilla_containers += 1
                check(c["livenessProbe"]["httpGet"]["path"] == "/healthz", f"{name}: liveness not /healthz")
                check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{name}: readiness not /readyz")
                ports = {p["name"]: p["containerPort"] for p in c["ports"]}
                check(ports.get("flotilla") == fl["httpPort"], f"{name}: HTTP port {ports}")
                check(("grpc" in ports) == standalone, f"{name}: gRPC port exposed={'grpc' in ports}")
            if c["name"] == "cluster-autoscaler":
                cmd = c["command"]
                check("--cloud-provider=externalgrpc" in cmd, f"{name}: no --cloud-provider=externalgrpc")
                check("--cloud-config=/etc/cluster-autoscaler/cloud-config.yaml" in cmd, f"{name}: no --cloud-config")
                expanders = [f.split("=", 1)[1] for f in cmd if f.startswith("--expander=")]
                check(len(expanders) <= 1, f"{name}: --expander given {len(expanders)} times")
                if fl["priorityExpander"]["enabled"]:
                    check(expanders and "priority" in expanders[0].split(","),
                          f"{name}: priorityExpander.enabled but CA's expanders are {expanders}")
                if expanders and "priority" in expanders[0].split(","):
                    ca_reads = any(r["metadata"]["name"].endswith("-provider") is False
                                   and "cluster-autoscaler-priority-expander" in rule.get("resourceNames", [])
                                   and {"get", "watch"} <= set(rule.get("verbs", []))
                                   for r in by_kind.get("Role", []) for rule in r["rules"])
                    check(ca_reads, f"{name}: CA runs the priority expander but may not read its ConfigMap")
                for k, v in values["autoscaler"]["extraArgs"].items():
                    flag = "--" + k.split("_")[0] + ("" if v is None else f"={str(v).lower() if isinstance(v, bool) else v}")
                    check(flag in cmd, f"{name}: extraArgs {k} not rendered as {flag}")
    check(flotilla_containers == 1, f"{flotilla_containers} Flotilla containers")

    # RBAC behind its values.
    rules = [(r["metadata"]["name"], rule) for kind in ("ClusterRole", "Role") for r in by_kind.get(kind, []) for rule in r["rules"]]
    node_delete = any("nodes" in rule.get("resources", []) and "delete" in rule.get("verbs", []) for _, rule in rules)
    check(node_delete == bool(fl["nodeCleanup"]["enabled"]), f"nodes/delete granted={node_delete}, nodeCleanup={fl['nodeCleanup']['enabled']}")
    lease = fl["leaderElection"]["leaseName"]
    flotilla_lease = any(lease in rule.get("resourceNames", []) and "leases" in rule.get("resources", []) for _, rule in rules)
    check(flotilla_lease == (replicas > 1), f"Flotilla's Lease granted={flotilla_lease} with {replicas} replicas")
    expander = any("cluster-autoscaler-priority-expander" in rule.get("resourceNames", []) and "patch" in rule.get("verbs", [])
                   for _, rule in rules)
    # Exactly the calls Flotilla makes (src/kube/api.rs): nothing broader.
    for role, rule in rules:
        if role.endswith("-provider"):
            allowed = {"nodes": {"get", "list", "delete"}, "leases": {"create", "get", "update"}, "configmaps": {"create", "patch"}}
            for res in rule.get("resources", []):
                extra = set(rule.get("verbs", [])) - allowed.get(res, set())
                check(not extra, f"{role}: {res} granted {sorted(extra)} beyond what Flotilla calls")
    check(expander == bool(fl["priorityExpander"]["enabled"]), f"priority-expander write granted={expander}")
    for d in by_kind.get("Secret", []):
        check(False, f"the chart renders a Secret ({d['metadata']['name']}); secrets must come from existing Secrets")

    for p in problems:
        print(f"  {sys.argv[1]}: {p}")
    sys.exit(1 if problems else 0)


main()
