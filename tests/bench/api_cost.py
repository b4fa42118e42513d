#!/usr/bin/env python3
"""Control-plane CPU per API request, by the kind of request tokenkeeper makes.

Run through tests/bench/api-cost.sh, which starts a control plane for it.
For each kind of request it sends N of them (12 at a time, in five chunks
each measured from idle to idle) and prints the CPU-milliseconds etcd,
kube-apiserver and kube-controller-manager used per request in the median
chunk (with the cheapest and the dearest chunk). This is what a cold start
of N connections costs the control plane per request, whoever sends it.
"""

import base64
import concurrent.futures
import http.client
import json
import re
import ssl
import sys
import threading
import time

STATE = sys.argv[1]
N = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
NAMESPACE = "api-cost"
CONNECTIONS = f"/apis/tokenkeeper.dev/v1alpha1/namespaces/{NAMESPACE}/sourceconnections"
SECRETS = f"/api/v1/namespaces/{NAMESPACE}/secrets"
TICKS = 100  # USER_HZ

kubeconfig = open(f"{STATE}/kubeconfig").read()
server = re.search(r"server: https://([\d.]+):(\d+)", kubeconfig)
token = re.search(r"token: (\S+)", kubeconfig).group(1)
tls = ssl.create_default_context(cafile=f"{STATE}/certs/apiserver.crt")
tls.check_hostname = False
processes = [line.split() for line in open(f"{STATE}/pids")]
local = threading.local()


def request(method, path, body=None, content_type="application/json"):
    if not hasattr(local, "conn"):
        local.conn = http.client.HTTPSConnection(server.group(1), int(server.group(2)), context=tls)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
    local.conn.request(method, path, json.dumps(body) if body is not None else None, headers)
    response = local.conn.getresponse()
    payload = response.read()
    if response.status >= 300:
        raise RuntimeError(f"{method} {path}: {response.status} {payload[:300]!r}")
    return json.loads(payload)


def cpu_seconds():
    used = []
    for _, pid in processes:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        used.append((int(fields[11]) + int(fields[12])) / TICKS)
    return used


def wait_idle():
    before = cpu_seconds()
    while True:
        time.sleep(2)
        now = cpu_seconds()
        if sum(now) - sum(before) < 0.1:
            return
        before = now


def measure(label, send, chunks=5):
    """Sends N requests in chunks, each measured on its own, and prints the
    median chunk: the control plane's periodic work (the garbage
    collector's resyncs, etcd's compaction) lands in one chunk, not in all."""
    results = []
    size = -(-N // chunks)
    for start in range(0, N, size):
        part = range(start, min(start + size, N))
        wait_idle()
        before = cpu_seconds()
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            list(pool.map(send, part))
        wait_idle()
        results.append([(after - b) * 1000 / len(part) for after, b in zip(cpu_seconds(), before)])
    results.sort(key=sum)
    used = results[len(results) // 2]
    spread = f"chunks {sum(results[0]):.2f}-{sum(results[-1]):.2f}"
    split = ", ".join(f"{name} {ms:.2f}" for (name, _), ms in zip(processes, used))
    print(f"{label:50s} {sum(used):5.2f} ms  ({split}; {spread})", flush=True)


def name(i):
    return f"c{i:05}"


uids = {}


def create_connection(i):
    uids[i] = request("POST", CONNECTIONS, {
        "apiVersion": "tokenkeeper.dev/v1alpha1", "kind": "SourceConnection",
        "metadata": {"name": name(i)},
        "spec": {"oauth2": {
            "tokenUrl": "http://127.0.0.1:9/token", "grant": "refreshToken",
            "client": {"secretRef": {"name": "oauth-client"}},
            "refreshTokenSecretRef": {"name": f"{name(i)}-grant", "key": "refresh_token"},
            "revokeOnDelete": False}},
    })["metadata"]["uid"]


def target_secret(i, secret_name):
    """Shaped like the target Secret tokenkeeper writes."""
    text = lambda s: base64.b64encode(s.encode()).decode()
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {
            "name": secret_name, "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/managed-by": "tokenkeeper",
                       "tokenkeeper.dev/connection": name(i),
                       "tokenkeeper.dev/secret-role": "credentials"},
            "annotations": {"tokenkeeper.dev/issued-at": "2026-11-23T16:00:00Z",
                            "tokenkeeper.dev/next-refresh-at": "2026-11-23T16:01:20.000Z",
                            "tokenkeeper.dev/sealed-grant": "v1.0." + "x" * 270,
                            "tokenkeeper.dev/token-request-sha256": "0" * 64},
            "ownerReferences": [{"apiVersion": "tokenkeeper.dev/v1alpha1",
                                 "kind": "SourceConnection", "name": name(i),
                                 "uid": uids[i], "controller": True}]},
        "data": {"access_token": text("a" * 40), "expires_at": text("2026-11-23T16:02:00Z"),
                 "scope": "", "token_type": text("Bearer")},
    }


def status(message):
    condition = lambda type_, status_, reason, text: {
        "type": type_, "status": status_, "reason": reason, "message": text,
        "lastTransitionTime": "2026-11-23T16:00:00Z", "observedGeneration": 1}
    return {"observedGeneration": 1, "conditions": [
        condition("Ready", "True", "SecretSynced", message),
        condition("AuthFailed", "False", "NotRejected",
                  "No credential of this connection has been rejected.")]}


APPLY = "application/apply-patch+yaml"
FORCE = "?fieldManager=tokenkeeper&force=true"
versions = {}

request("POST", "/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
measure("create SourceConnection (the user's)", create_connection)
measure("create target Secret (tokenkeeper: a plain create)",
        lambda i: request("POST", f"{SECRETS}?fieldManager=tokenkeeper",
                          target_secret(i, f"{name(i)}-credentials")))
measure("create a Secret by server-side apply (compare)",
        lambda i: request("PATCH", f"{SECRETS}/{name(i)}-other{FORCE}",
                          target_secret(i, f"{name(i)}-other"), APPLY))


def refreshed(i):
    secret = target_secret(i, f"{name(i)}-credentials")
    secret["data"]["access_token"] = base64.b64encode(b"b" * 40).decode()
    return secret


measure("refresh target Secret, server-side apply",
        lambda i: request("PATCH", f"{SECRETS}/{name(i)}-credentials{FORCE}", refreshed(i), APPLY))
measure("status, server-side apply",
        lambda i: request("PATCH", f"{CONNECTIONS}/{name(i)}/status{FORCE}",
                          {"apiVersion": "tokenkeeper.dev/v1alpha1", "kind": "SourceConnection",
                           "status": status(f"Secret {name(i)}-credentials holds it.")}, APPLY))
measure("status, merge patch",
        lambda i: request("PATCH", f"{CONNECTIONS}/{name(i)}/status?fieldManager=tokenkeeper",
                          {"status": status(f"Secret {name(i)}-credentials holds it now.")},
                          "application/merge-patch+json"))
current = {item["metadata"]["name"]: item for item in request("GET", CONNECTIONS)["items"]}


def replaced_status(i):
    connection = current[name(i)]
    connection["status"] = status(f"Secret {name(i)}-credentials holds it, replaced.")
    return connection


measure("status, replace (PUT of the whole object)",
        lambda i: request("PUT", f"{CONNECTIONS}/{name(i)}/status?fieldManager=tokenkeeper",
                          replaced_status(i)))
measure("status, server-side apply, Ready condition only (compare)",
        lambda i: request("PATCH", f"{CONNECTIONS}/{name(i)}/status{FORCE}",
                          {"apiVersion": "tokenkeeper.dev/v1alpha1", "kind": "SourceConnection",
                           "status": {"observedGeneration": 1,
                                      "conditions": status(f"Secret {name(i)}-credentials.")
                                      ["conditions"][:1]}}, APPLY))
measure("event (events.k8s.io/v1)",
        lambda i: request("POST", f"/apis/events.k8s.io/v1/namespaces/{NAMESPACE}/events", {
            "metadata": {"name": f"{name(i)}.{i:x}", "namespace": NAMESPACE},
            "eventTime": "2026-11-23T16:00:00.000000Z", "reportingController": "tokenkeeper",
            "reportingInstance": "tokenkeeper", "action": "Reconcile", "reason": "TokenIssued",
            "type": "Normal", "note": "Obtained an access token valid until 2026-11-23T17:00:00Z",
            "regarding": {"apiVersion": "tokenkeeper.dev/v1alpha1", "kind": "SourceConnection",
                          "name": name(i), "namespace": NAMESPACE, "uid": uids[i]}}))
for item in request("GET", SECRETS)["items"]:
    versions[item["metadata"]["name"]] = item["metadata"]["resourceVersion"]
measure("read Secret, from etcd (no resourceVersion)",
        lambda i: request("GET", f"{SECRETS}/{name(i)}-credentials"))
measure("read Secret, from the watch cache (at a version)",
        lambda i: request("GET", f"{SECRETS}/{name(i)}-credentials?resourceVersion="
                          + versions[f"{name(i)}-credentials"]))
