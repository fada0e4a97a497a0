"""`make run-kube`: the bookinfo demo on a local, real kube-apiserver + etcd.

Starts the API server (`scripts/kube/kube.sh up`: built once, cached), installs what makes
sense without a kubelet from manifests/ (CRDs, namespace, ServiceAccount, RBAC; the
webhook configurations pointed at https://localhost:15017), applies samples/k8s, and —
standing in for the kubelet and the EndpointSlice controller — creates one Pod per
Deployment and the Services' EndpointSlices. A real API server refuses loopback endpoint
addresses, so each Pod is a network namespace (tests/netns_mesh.py, 198.18.x.y; needs root)
where samples/backend.py answers. Then `meshline serve --kubernetes` and one real Envoy sidecar of
bookinfo/productpage, authenticated by a real projected service-account token (TokenRequest,
audience `meshline`) over TLS to 15012. Prints what to curl and which edits to try; Ctrl-C
stops Meshline, Envoy and the backends (`make kube-down` stops the API server).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from controlplane.localrun import start_envoy, stop, wait_http, wait_port  # noqa: E402
from tests.kube_real.cluster import RealKube  # noqa: E402
from tests.netns_mesh import Topology, missing_tools  # noqa: E402

NS = "bookinfo"
SYSTEM = "meshline-system"
WORKLOADS = ("productpage-v1", "details-v1", "ratings-v1", "reviews-v1", "reviews-v2", "reviews-v3")
WEBHOOK_PORT = 15017
INSTALL = ("namespace.yaml", "serviceaccount.yaml", "rbac.yaml")


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def local_kube() -> RealKube:
    """The API server of `make kube` (state in .run/kube, port 16443), started if needed."""
    kube = RealKube(Path(os.environ.get("MESHLINE_KUBE_DIR", ROOT / ".run" / "kube")))
    kube.api_port = int(os.environ.get("MESHLINE_KUBE_PORT", "16443"))
    kube.etcd_port = int(os.environ.get("MESHLINE_ETCD_PORT", "16379"))
    print(f"starting the local API server (first time: builds it, ~10-20 min) ... ready in {kube.up():.1f} s",
          flush=True)
    return kube


def install(kube: RealKube) -> None:
    """What makes sense without a kubelet from manifests/: the CRDs, namespace, ServiceAccount
    and RBAC (kubectl apply), and the webhook configurations pointed at localhost."""
    kube.kubectl("apply", "-k", str(ROOT / "manifests" / "crds"))
    kube.kubectl("apply", *(a for rel in INSTALL for a in ("-f", str(ROOT / "manifests" / rel))))
    kube.install_crds()  # waits until they are Established
    hooks = []
    for rel in ("mutatingwebhookconfiguration.yaml", "validatingwebhookconfiguration.yaml"):
        for d in docs(ROOT / "manifests" / "webhooks" / rel):
            for hook in d["webhooks"]:
                svc = hook["clientConfig"].pop("service")
                hook["clientConfig"]["url"] = f"https://localhost:{WEBHOOK_PORT}{svc['path']}"
                hook["clientConfig"].pop("caBundle", None)  # the leader patches it in
            hooks.append(d)
    kube.kubectl_apply(*hooks)


def apply_bookinfo(kube: RealKube, ips: dict[str, str]) -> None:
    """samples/k8s as-is, plus what the kubelet and controllers would add: Pods with IPs and
    the EndpointSlices of the Services."""
    base = ROOT / "samples" / "k8s"
    kube.kubectl("apply", "-k", str(base))
    deployments, services = [], []
    for rel in yaml.safe_load((base / "kustomization.yaml").read_text())["resources"]:
        for d in docs(base / rel):
            if d["kind"] == "Deployment":
                deployments.append(d)
            elif d["kind"] == "Service":
                services.append(d)
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": NS}})
    pods = []
    for dep in deployments:
        name = dep["metadata"]["name"]
        tmpl = dep["spec"]["template"]
        # Their "containers" are samples/backend.py in a network namespace, with no Envoy in
        # front: opted out of injection, so that Meshline sends them plaintext.
        labels = {**tmpl["metadata"]["labels"], "meshline.io/inject": "false"}
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"{name}-0", "namespace": NS, "labels": labels},
                "spec": tmpl["spec"]}
        pods.append(kube.pod(body, ips[name]))
    for svc in services:
        sel = svc["spec"]["selector"]
        members = [p for p in pods if all(p["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        ports = [{"name": p["name"], "port": 9080, "protocol": "TCP", "appProtocol": p.get("appProtocol")}
                 for p in svc["spec"]["ports"]]
        kube.apply({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": f"{svc['metadata']['name']}-local", "namespace": NS,
                                 "labels": {"kubernetes.io/service-name": svc["metadata"]["name"],
                                            "endpointslice.kubernetes.io/managed-by": "run-kube-demo"}},
                    "addressType": "IPv4", "ports": [{k: v for k, v in p.items() if v} for p in ports],
                    "endpoints": [{"addresses": [p["status"]["podIP"]], "conditions": {"ready": True},
                                   "targetRef": {"kind": "Pod", "name": p["metadata"]["name"], "namespace": NS}}
                                  for p in members]})


def trust_bundle(kube: RealKube, wait_s: float = 10.0) -> str:
    """The mesh trust bundle as an injected sidecar gets it: the ConfigMap meshline-ca-root
    of its namespace; failing that (nothing writes it yet), the CA root Secret."""
    import base64

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        cm = kube.get("v1", "ConfigMap", "meshline-ca-root", NS)
        if cm and cm.get("data", {}).get("root-cert.pem"):
            return str(cm["data"]["root-cert.pem"])
        time.sleep(0.3)
    print(f"note: no ConfigMap {NS}/meshline-ca-root after {wait_s:.0f} s; using the root of the Secret "
          f"{SYSTEM}/meshline-ca-root", flush=True)
    secret = kube.get("v1", "Secret", "meshline-ca-root", SYSTEM) or {}
    return base64.b64decode(secret.get("data", {}).get("root-cert.pem", "")).decode()


def main() -> int:
    why = missing_tools()
    if why:
        print(f"run-kube: the pods are network namespaces (a real API server refuses loopback endpoint "
              f"addresses), and that {why}", file=sys.stderr)
        return 1
    kube = local_kube()
    install(kube)
    work = Path(tempfile.mkdtemp(prefix="meshline-kube-demo-"))
    meshline = str(Path(sys.executable).parent / "meshline")
    procs: list[subprocess.Popen[bytes]] = []
    with Topology() as topo:
        try:
            return run(kube, topo, work, meshline, procs)
        except KeyboardInterrupt:
            return 0
        finally:
            for p in reversed(procs):
                stop(p)
            print("\nstopped Envoy, the backends and meshline (the API server keeps running: make kube-down).")


def run(kube: RealKube, topo: Topology, work: Path, meshline: str, procs: list[subprocess.Popen[bytes]]) -> int:
    node = topo.add_node("demo")
    ips = {}
    for name in WORKLOADS:
        pod = node.add_pod(name.replace("-", "")[:10])
        topo.track(pod.serve_http(9080, name))
        ips[name] = pod.ip
    procs.append(subprocess.Popen(
        [meshline, "serve", "--kubernetes", "--kubeconfig", str(kube.kubeconfig),
         "--xds-address", "127.0.0.1:15010", "--status-address", "127.0.0.1:15014",
         "--webhook-address", f"127.0.0.1:{WEBHOOK_PORT}", "--ca-address", "127.0.0.1:15012"],
        stdout=open(work / "meshline.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "POD_NAME": "meshline-local", "POD_NAMESPACE": SYSTEM}))
    wait_http("http://127.0.0.1:15014/readyz", proc=procs[-1], timeout=60)
    # The webhooks are registered fail-closed: objects in bookinfo are created once Meshline
    # serves them and its leader has patched the caBundle in.
    wait_port("127.0.0.1", WEBHOOK_PORT, timeout=60)
    deadline = time.monotonic() + 60
    while not all(h.get("clientConfig", {}).get("caBundle")
                  for kind, name in (("MutatingWebhookConfiguration", "meshline-sidecar-injector"),
                                     ("ValidatingWebhookConfiguration", "meshline-validator"))
                  for h in (kube.get("admissionregistration.k8s.io/v1", kind, name) or {}).get("webhooks", [{}])):
        if time.monotonic() > deadline or procs[-1].poll() is not None:
            raise SystemExit(f"Meshline did not patch the webhooks' caBundle; see {work}/meshline.log")
        time.sleep(0.3)
    apply_bookinfo(kube, ips)
    # What the injector does to a pod of this namespace (a dry run: the API server calls the
    # mutating webhook, then stores nothing).
    from kubernetes import client as k8s

    probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "injection-probe", "namespace": NS},
             "spec": {"serviceAccountName": "demo-client",
                      "containers": [{"name": "app", "image": "example/app"}]}}
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "demo-client", "namespace": NS}})
    probed = k8s.CoreV1Api(kube.api).create_namespaced_pod(NS, probe, dry_run="All")
    injected = [c.name for c in [*(probed.spec.init_containers or []), *probed.spec.containers]]
    # The demo client: a Pod (on loopback: the Envoy runs on this host) whose sidecar is the
    # Envoy below, with its projected token (what the kubelet would mount) and the trust bundle.
    kube.pod({"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": "demo-client", "namespace": NS,
                           "labels": {"app": "demo-client", "meshline.io/inject": "false"}},
              "spec": {"serviceAccountName": "demo-client", "containers": [{"name": "app", "image": "example/app"}]}},
             "127.0.0.1")
    token = work / "token"
    token.write_text(kube.token(NS, "demo-client", ["meshline"], seconds=3600, pod="demo-client"))
    bundle = work / "root-cert.pem"
    bundle.write_text(trust_bundle(kube))
    boot = subprocess.run(
        [meshline, "bootstrap", "--node-id", "sidecar~bookinfo/demo-client", "--namespace", NS,
         "--workload", "demo-client", "--service-account", "demo-client",
         "--labels", "app=demo-client", "--capture", "bind", "--xds-tls",
         "--xds-address", "127.0.0.1:15012", "--token-file", str(token), "--ca-bundle", str(bundle)],
        check=True, capture_output=True, text=True).stdout
    envoy = start_envoy(boot, work, "sidecar", log_level="warning")
    procs.append(envoy)
    wait_http("http://127.0.0.1:15000/ready", proc=envoy)
    wait_port("127.0.0.1", 9080)
    print(f"""
Meshline is serving bookinfo from a real kube-apiserver to a real Envoy sidecar.
  API server:    {kube.url}   export KUBECONFIG={kube.kubeconfig}
  control plane: xDS 127.0.0.1:15010 / TLS 15012, status http://127.0.0.1:15014/v1/services
  sidecar:       bookinfo/demo-client's (token: TokenRequest, audience meshline), admin http://127.0.0.1:15000
  pods:          network namespaces {", ".join(f"{k}={v}" for k, v in ips.items())}
                 created through the API (opted out of injection: no Envoy runs in them); a
                 dry-run Pod in bookinfo comes back from the webhook with {injected}
  logs:          {work}

Try:
  for i in $(seq 20); do curl -s -H 'Host: reviews.bookinfo' http://127.0.0.1:9080/ | grep -o '"reviews-v[0-9]"'; done | sort | uniq -c
  curl -s -H 'Host: reviews.bookinfo' -H 'end-user: jason' http://127.0.0.1:9080/

With kubectl (scripts/kube/kube.sh kubectl ARGS is the one built with the API server):
  kubectl -n bookinfo get virtualservices,destinationrules
  kubectl -n bookinfo get virtualservice reviews -o jsonpath='{{.status.conditions}}'   # written by Meshline
  kubectl -n bookinfo edit virtualservice reviews        # change the weights: the curl loop follows
  kubectl -n bookinfo patch virtualservice reviews --type=merge \\
      -p '{{"spec":{{"http":[{{"match":[{{"uri":{{"regex":"(unclosed"}}}}],"route":[{{"destination":{{"host":"reviews"}}}}]}}]}}}}'
      # refused by the API server calling Meshline's validating webhook (the regex, and why)
  kubectl -n bookinfo delete endpointslice reviews-local  # reviews has no endpoints: 503

Ctrl-C stops Meshline, Envoy and the backends; `make kube-down` stops the API server.""", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    while not stopped.is_set():
        for p in procs:
            if p.poll() is not None:
                print(f"a process exited unexpectedly ({p.args[0]}); see {work}", file=sys.stderr)
                return 1
        stopped.wait(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
