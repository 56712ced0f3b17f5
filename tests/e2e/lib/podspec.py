"""Turns a rendered pod template into local processes, for the chart scenario of tests/e2e/run.

    podspec.py DEPLOYMENT.json OBJECTS.json ROOT OUT.sh

DEPLOYMENT.json is the Deployment as kube-apiserver returned it (`kubectl apply --dry-run=server
-o json`); OBJECTS.json a List of the ConfigMaps and Secrets its volumes name, read back from the
API. Every volume of every container is materialised under ROOT (ConfigMap and Secret items,
subPath mounts, emptyDirs), paths under a mountPath are rewritten to ROOT/<mountPath> in the
containers' arguments and in the mounted files, and env entries are resolved (values, Secret and
ConfigMap keys, the downward API). OUT.sh gets, per container, a bash array of its command and
arguments and one of its environment (`NAME=value`), named after the container:
`cmd_cluster_autoscaler`, `env_cluster_autoscaler`, `cmd_flotilla`, `env_flotilla`.
"""

import base64
import json
import os
import re
import shlex
import sys

deployment = json.load(open(sys.argv[1]))
objects = {(o["kind"], o["metadata"]["name"]): o for o in json.load(open(sys.argv[2]))["items"]}
root = sys.argv[3].rstrip("/")
pod = deployment["spec"]["template"]["spec"]
namespace = deployment["metadata"]["namespace"]
volumes = {v["name"]: v for v in pod.get("volumes", [])}


def source_files(volume):
    """name -> bytes of a ConfigMap or Secret volume, honouring items."""
    if "configMap" in volume:
        obj = objects[("ConfigMap", volume["configMap"]["name"])]
        data = {k: v.encode() for k, v in obj.get("data", {}).items()}
        items = volume["configMap"].get("items")
    elif "secret" in volume:
        obj = objects[("Secret", volume["secret"]["secretName"])]
        data = {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}
        items = volume["secret"].get("items")
    else:
        return None
    if items:
        return {i["path"]: data[i["key"]] for i in items}
    return data


def rooted(path):
    return root + path


def rewrite(text, mounts):
    """Every path under a mount, in one pass (a rooted path is never rewritten again)."""
    if not mounts:
        return text
    alternatives = "|".join(re.escape(m.rstrip("/")) for m in sorted(mounts, key=len, reverse=True))
    pattern = re.compile(r"(?<![\w./-])(" + alternatives + r")(?=$|[/\"'\s,\]])")
    return pattern.sub(lambda m: rooted(m.group(1)), text)


out = []
for c in pod["containers"]:
    mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
    written = []
    for m in c.get("volumeMounts", []):
        files = source_files(volumes[m["name"]])
        target = rooted(m["mountPath"])
        if files is None:  # emptyDir and the like: a writable directory
            os.makedirs(target, exist_ok=True)
        elif "subPath" in m:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "wb").write(files[m["subPath"]])
            written.append(target)
        else:
            for name, content in files.items():
                os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
                open(os.path.join(target, name), "wb").write(content)
                written.append(os.path.join(target, name))
    for f in written:
        try:
            text = open(f).read()
        except UnicodeDecodeError:
            continue
        open(f, "w").write(rewrite(text, mounts))
    env = []
    for e in c.get("env", []):
        if "value" in e:
            value = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            value = base64.b64decode(objects[("Secret", ref["name"])]["data"][ref["key"]]).decode()
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            value = objects[("ConfigMap", ref["name"])]["data"][ref["key"]]
        else:
            field = e["valueFrom"]["fieldRef"]["fieldPath"]
            value = {"metadata.namespace": namespace, "metadata.name": deployment["metadata"]["name"] + "-e2e",
                     "spec.serviceAccountName": pod.get("serviceAccountName", "default")}[field]
        env.append(f"{e['name']}={value}")
    argv = [rewrite(a, mounts) for a in c.get("command", []) + c.get("args", [])]
    var = c["name"].replace("-", "_")
    out.append(f"cmd_{var}=({' '.join(shlex.quote(a) for a in argv)})")
    out.append(f"env_{var}=({' '.join(shlex.quote(a) for a in env)})")
open(sys.argv[4], "w").write("\n".join(out) + "\n")
