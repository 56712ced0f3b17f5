"""What `flotilla import` prints for Helm, taken as a user would (tests/chart/run calls it).

    imported.py extract REPORT DIR
        Reads the import's report (its standard output with -o), writes the values block as
        printed to DIR/flotilla-values.yaml, the Secrets the printed kubectl commands create to
        DIR/secrets.json ({secret: {key: local file or null}}), and prints the arguments of the
        printed `helm upgrade --install` after the chart, one per line.

    imported.py pod RENDERED DIR ROOT
        Checks the rendered chart against the printed commands: every secretKeyRef of the
        Flotilla container names a key the kubectl commands create, and every Secret volume
        mount a file they put in it. Then lays out the Flotilla container's view under ROOT:
        flotilla.toml from the ConfigMap at ROOT/etc/flotilla/flotilla.toml, and each file
        mounted from a Secret at ROOT/<mountPath>, copied from the local file the kubectl
        command reads (relative to DIR). Prints the container's secret env var names.

Prints the problems and exits 1 if there are any.
"""

import json
import os
import shlex
import shutil
import sys

import yaml


def fail(message):
    print(message)
    sys.exit(1)


def extract(report, out_dir):
    lines = open(report).read().splitlines()
    starts = [i for i, l in enumerate(lines) if l.startswith("Or with Helm:") and l.endswith("Values (flotilla-values.yaml):")]
    if len(starts) != 1:
        fail(f"{report}: expected one 'Or with Helm: ... Values (flotilla-values.yaml):' line, found {len(starts)}")
    i = starts[0] + 1
    values = []
    while i < len(lines) and lines[i].startswith("  "):
        values.append(lines[i])
        i += 1
    # Saved as printed, indentation included: a user may paste it so.
    open(os.path.join(out_dir, "flotilla-values.yaml"), "w").write("\n".join(values) + "\n")
    if i >= len(lines) or not lines[i].endswith("(again after every change to it):"):
        fail(f"{report}: no install line after the values (line {i + 1}: {lines[i] if i < len(lines) else 'end'})")
    i += 1
    commands = []
    while i < len(lines) and lines[i].startswith("  "):
        commands.append(shlex.split(lines[i]))
        i += 1
    secrets = {}
    helm = None
    for words in commands:
        if words[:3] == ["kubectl", "create", "namespace"]:
            continue
        if words[:2] == ["kubectl", "-n"] and words[3:6] == ["create", "secret", "generic"]:
            keys = secrets.setdefault(words[6], {})
            for w in words[7:]:
                if w.startswith("--from-literal="):
                    keys[w.split("=", 2)[1]] = None
                elif w.startswith("--from-file="):
                    key, path = w[len("--from-file="):].split("=", 1)
                    keys[key] = path
                else:
                    fail(f"unexpected kubectl argument {w!r}")
            continue
        if words[:5] == ["helm", "upgrade", "--install", "autoscaler", "charts/flotilla"]:
            helm = words[5:]
            continue
        fail(f"unexpected command: {shlex.join(words)}")
    if helm is None:
        fail("no helm upgrade --install command")
    json.dump(secrets, open(os.path.join(out_dir, "secrets.json"), "w"))
    print("\n".join(helm))


def pod(rendered, out_dir, root):
    secrets = json.load(open(os.path.join(out_dir, "secrets.json")))
    docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
    problems = []
    toml = [d["data"]["flotilla.toml"] for d in docs if d["kind"] == "ConfigMap" and "flotilla.toml" in d.get("data", {})]
    deps = [d for d in docs if d["kind"] == "Deployment"]
    if len(toml) != 1 or len(deps) != 1:
        fail(f"expected one flotilla.toml and one Deployment, found {len(toml)} and {len(deps)}")
    spec = deps[0]["spec"]["template"]["spec"]
    container = next(c for c in spec["containers"] if c["name"] == "flotilla")
    config_mount = next(m for m in container["volumeMounts"] if m.get("subPath") == "flotilla.toml")
    config = os.path.join(root, config_mount["mountPath"].lstrip("/"))
    os.makedirs(os.path.dirname(config), exist_ok=True)
    open(config, "w").write(toml[0])
    env = []
    for e in container.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            continue
        env.append(e["name"])
        if ref["key"] not in secrets.get(ref["name"], {}):
            problems.append(f"env {e['name']} reads Secret {ref['name']} key {ref['key']}, which the printed commands do not create")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in container["volumeMounts"]:
        secret = volumes[m["name"]].get("secret")
        if secret is None or secret["secretName"] not in secrets:
            continue
        files = secrets[secret["secretName"]]
        if "subPath" not in m:
            problems.append(f"Secret {secret['secretName']} is mounted as a directory at {m['mountPath']}")
            continue
        local = files.get(m["subPath"])
        if local is None:
            problems.append(f"{m['mountPath']} is key {m['subPath']} of Secret {secret['secretName']}, which the printed commands do not fill from a file")
            continue
        target = os.path.join(root, m["mountPath"].lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(out_dir, local), target)
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    print("\n".join(env))


if sys.argv[1] == "extract":
    extract(sys.argv[2], sys.argv[3])
elif sys.argv[1] == "pod":
    pod(sys.argv[2], sys.argv[3], sys.argv[4])
else:
    fail(f"unknown command {sys.argv[1]}")
