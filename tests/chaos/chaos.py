#!/usr/bin/env python3
"""Chaos soak: rotating OAuth 2.0 connections under the faults of real
clusters, counting what it costs.

Runs on a control plane of its own (tests/cluster/up.sh) with oidc-provider
rotating refresh tokens and revoking a grant whose refresh token is used
twice, two operator replicas with leader election, and for a fixed time one
fault after another, at random moments:

- kill:   SIGKILL of the leader (at a random moment, so sometimes inside a
          refresh), restarted at once;
- freeze: SIGSTOP of the leader for longer than its lease, then SIGCONT;
- api:    kube-apiserver stopped for longer than a refresh period, started again;
- provider: the token endpoint answering 500 for a minute.

Prints refreshes done, grants lost (reuses the provider reported, and
connections that need a new authorization), expired tokens seen in Secrets,
and for each lost grant the fault window it fell in.

    tests/chaos/run.sh [--connections 100] [--minutes 10] [--token-seconds 20]
"""
import argparse
import base64
import calendar
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NAMESPACE = "chaos"
LEASE = ["--leader-elect", "--leader-election-namespace", "default",
         "--leader-election-lease", "tokenkeeper-chaos", "--lease-duration-seconds", "6",
         "--renew-deadline-seconds", "4", "--retry-period-seconds", "1"]


def log(*args):
    print(f"[chaos {time.strftime('%H:%M:%S')}]", *args, flush=True)


class Plane:
    def __init__(self, state):
        self.state = state
        self.kubeconfig = os.path.join(state, "kubeconfig")

    def kubectl(self, *args, stdin=None, check=True):
        out = subprocess.run(["kubectl", "--kubeconfig", self.kubeconfig, *args],
                             input=stdin, capture_output=True, text=True)
        if check and out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr}")
        return out.stdout

    def apiserver(self):
        with open(os.path.join(self.state, "pids")) as pids:
            pid = [line.split()[1] for line in pids if line.startswith("kube-apiserver ")][-1]
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return int(pid), [a.decode() for a in cmdline.read().split(b"\0") if a]

    def stop_apiserver(self):
        pid, args = self.apiserver()
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.1)
        return args

    def start_apiserver(self, args):
        with open(os.path.join(self.state, "logs", "kube-apiserver.log"), "ab") as out:
            child = subprocess.Popen(args, stdout=out, stderr=out,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        with open(os.path.join(self.state, "pids"), "a") as pids:
            pids.write(f"kube-apiserver {child.pid}\n")
        for _ in range(120):
            if self.kubectl("get", "--raw", "/readyz", check=False).strip() == "ok":
                return
            time.sleep(0.5)
        raise RuntimeError("kube-apiserver did not come back")


class Provider:
    def __init__(self, token_seconds, logs):
        options = json.dumps({"accessTokenTtl": token_seconds, "rotateRefreshToken": True,
                              "refreshTokenTtl": 30 * 24 * 3600})
        self.log = open(os.path.join(logs, "provider.log"), "w")
        self.child = subprocess.Popen(["node", os.path.join(REPO, "tests/oauth/server.mjs"), options],
                                      stdout=subprocess.PIPE, stderr=self.log, text=True)
        ready = json.loads(self.child.stdout.readline())
        self.issuer = ready["issuer"]

    def control(self, path, body=None):
        request = urllib.request.Request(f"{self.issuer}/test/{path}", method="POST",
                                         data=json.dumps(body or {}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)

    def stop(self):
        self.child.kill()
        self.child.wait()


class Replica:
    binary = os.path.join(REPO, "target", "debug", "tokenkeeper")

    def __init__(self, plane, logs, number):
        self.out = open(os.path.join(logs, f"operator-{number}.log"), "w")
        self.child = subprocess.Popen(
            [self.binary, "run", "--namespace", NAMESPACE, "--metrics-bind-address", "127.0.0.1:0",
             # Tokens of seconds: the floor between refreshes must not outlast them.
             "--min-refresh-interval-seconds", "1", "--allow-plain-http-loopback", *LEASE],
            env={**os.environ, "KUBECONFIG": plane.kubeconfig, "POD_NAMESPACE": "default",
                 "RUST_LOG": "info"},
            stdout=self.out, stderr=self.out)

    def signal(self, which):
        if self.child.poll() is None:
            os.kill(self.child.pid, which)


def connections(plane, provider, count):
    docs = ["apiVersion: v1\nkind: Secret\nmetadata:\n  name: crm-client\nstringData:\n"
            "  client_id: crm-client\n  client_secret: crm-client-secret\n"]
    for index in range(count):
        token = provider.control("mint-refresh-token", {"scope": "crm.read"})["refresh_token"]
        docs.append(f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: c{index}-grant\nstringData:\n"
                    f"  refresh_token: {token}\n")
        docs.append(
            f"apiVersion: tokenkeeper.dev/v1alpha1\nkind: SourceConnection\nmetadata:\n  name: c{index}\n"
            f"spec:\n  oauth2:\n    tokenUrl: {provider.issuer}/token\n    grant: refreshToken\n"
            f"    client:\n      secretRef:\n        name: crm-client\n"
            f"    refreshTokenSecretRef:\n      name: c{index}-grant\n      key: refresh_token\n")
    plane.kubectl("apply", "-n", NAMESPACE, "-f", "-", stdin="---\n".join(docs))


def ready_reasons(plane):
    out = plane.kubectl("get", "srcconn", "-n", NAMESPACE, "-o",
                        'jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].reason}{"\\n"}{end}',
                        check=False)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def leader_index(plane, replicas):
    holder = plane.kubectl("get", "lease", "tokenkeeper-chaos", "-n", "default", "-o",
                           "jsonpath={.spec.holderIdentity}", check=False)
    for index, replica in enumerate(replicas):
        if holder.endswith(f"-{replica.child.pid}") and replica.child.poll() is None:
            return index
    return None


class ExpiryWatch(threading.Thread):
    """Samples every target Secret's expires_at every two seconds."""

    def __init__(self, plane):
        super().__init__(daemon=True)
        self.plane, self.stop, self.samples, self.expired = plane, False, 0, []

    def run(self):
        while not self.stop:
            out = self.plane.kubectl("get", "secrets", "-n", NAMESPACE, "-l",
                                     "tokenkeeper.dev/secret-role=credentials", "-o",
                                     'jsonpath={range .items[*]}{.metadata.name}={.data.expires_at}{"\\n"}{end}',
                                     check=False)
            now = time.time()
            for line in out.splitlines():
                name, _, value = line.partition("=")
                if not value:
                    continue
                expires = base64.b64decode(value).decode()
                self.samples += 1
                if calendar.timegm(time.strptime(expires, "%Y-%m-%dT%H:%M:%SZ")) < now:
                    self.expired.append((now, name))
            time.sleep(2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--token-seconds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    random.seed(args.seed)
    state = tempfile.mkdtemp(prefix="tokenkeeper-chaos.")
    logs = os.path.join(REPO, "target", "chaos")
    os.makedirs(logs, exist_ok=True)
    subprocess.run([os.path.join(REPO, "tests/cluster/up.sh"), state], check=True)
    plane, provider, replicas, windows = Plane(state), None, [], []
    try:
        plane.kubectl("apply", "-f", os.path.join(REPO, "crds"))
        plane.kubectl("wait", "--for", "condition=established", "--timeout=60s", "-f",
                      os.path.join(REPO, "crds"))
        plane.kubectl("create", "namespace", NAMESPACE)
        provider = Provider(args.token_seconds, logs)
        connections(plane, provider, args.connections)
        replicas = [Replica(plane, logs, 0), Replica(plane, logs, 1)]
        started = time.time()
        while sum(r == "SecretSynced" for r in ready_reasons(plane).values()) < args.connections:
            if time.time() - started > 300:
                raise RuntimeError(f"not all Ready: {ready_reasons(plane)}")
            time.sleep(2)
        log(f"{args.connections} connections Ready after {time.time() - started:.0f} s; seed {args.seed}")
        initial = provider.control("stats")["tokenSuccesses"]
        watch = ExpiryWatch(plane)
        watch.start()
        end = time.time() + args.minutes * 60
        started_replicas = 2
        # Every kind of fault in turn, each round in a new order.
        order = []
        while time.time() < end:
            time.sleep(random.uniform(10, 30))
            if not order:
                order = random.sample(["kill", "freeze", "api", "provider"], 4)
            fault = order.pop()
            leader = leader_index(plane, replicas)
            begin = time.time()
            if fault in ("kill", "freeze") and leader is None:
                continue
            if fault == "kill":
                replicas[leader].signal(signal.SIGKILL)
                replicas[leader].child.wait()
            elif fault == "freeze":
                replicas[leader].signal(signal.SIGSTOP)
                time.sleep(6 + random.uniform(2, 6))
                replicas[leader].signal(signal.SIGCONT)
                time.sleep(3)
            elif fault == "api":
                saved = plane.stop_apiserver()
                time.sleep(args.token_seconds * 2 / 3 + random.uniform(5, 15))
                plane.start_apiserver(saved)
            else:
                provider.control("failure", {"mode": "500"})
                time.sleep(60)
                provider.control("failure", {"mode": "off"})
            windows.append((fault, begin, time.time()))
            log(f"{fault}: {time.time() - begin:.1f} s")
            for index, replica in enumerate(replicas):
                if replica.child.poll() is not None:
                    replicas[index] = Replica(plane, logs, started_replicas)
                    started_replicas += 1
        settle = time.time() + 90
        while time.time() < settle:
            reasons = ready_reasons(plane)
            if all(r in ("SecretSynced", "InvalidGrant", "RefreshTokenExpired") for r in reasons.values()):
                break
            time.sleep(3)
        watch.stop = True
        stats = provider.control("stats")
        reasons = ready_reasons(plane)
        lost = sorted(name for name, r in reasons.items() if r in ("InvalidGrant", "RefreshTokenExpired"))

        def window_of(at):
            for fault, begin, finish in windows:
                if begin - 1 <= at <= finish + args.token_seconds:
                    return f"{fault} at +{begin - started:.0f} s"
            return "no fault window"

        print()
        print(f"chaos soak: {args.connections} connections, {args.token_seconds} s tokens with rotation, "
              f"{args.minutes:g} min, seed {args.seed}")
        print(f"  faults:                 {', '.join(f'{f} {sum(w[0] == f for w in windows)}' for f in ('kill', 'freeze', 'api', 'provider'))}")
        print(f"  refreshes done:         {stats['tokenSuccesses'] - initial}")
        print(f"  token requests:         {stats['tokenRequests']}")
        print(f"  reused refresh tokens:  {stats['refreshTokenReuse']}")
        print(f"  grants lost:            {len(lost)} {' '.join(lost)}")
        print(f"  expired tokens seen:    {len(watch.expired)} of {watch.samples} samples "
              f"({len({n for _, n in watch.expired})} connections)")
        for at in stats.get("reuseTimes", []):
            print(f"  reuse at +{at / 1000 - started:.0f} s: {window_of(at / 1000)}")
        for fault, begin, finish in windows:
            expired = sum(begin <= t <= finish + args.token_seconds for t, _ in watch.expired)
            print(f"  {fault:9} +{begin - started:5.0f} s for {finish - begin:4.0f} s: {expired} expired samples")
        print(f"  logs: {logs}")
    finally:
        for replica in replicas:
            replica.signal(signal.SIGCONT)
            replica.signal(signal.SIGKILL)
        if provider:
            provider.stop()
        subprocess.run([os.path.join(REPO, "tests/cluster/down.sh"), state])
        subprocess.run(["rm", "-rf", state])


if __name__ == "__main__":
    sys.exit(main())
