#!/usr/bin/env python3
"""A tiny Kubernetes API for helm/test-chart.sh: `helm template --dry-run=server`
against it runs the chart's lookup calls on the objects given, without a cluster.

    python3 mock-kube-api.py PORTFILE OBJECTS.json

OBJECTS.json maps API paths (/apis/apps/v1/namespaces/NS/replicasets/NAME)
to objects. GET of a path gives its object (404 otherwise), GET of a
collection the objects under it; writes (Helm's dry-run create) are echoed.
Listens on a free port of 127.0.0.1, written to PORTFILE.
"""
import http.server
import json
import sys

portfile, objects = sys.argv[1], json.load(open(sys.argv[2]))

def resources(group_version, *kinds):
    return {"kind": "APIResourceList", "groupVersion": group_version, "resources": [
        {"name": plural, "singularName": kind.lower(), "namespaced": True, "kind": kind,
         "verbs": ["get", "list", "create", "patch"]} for plural, kind in kinds]}

GROUPS = {
    "apps/v1": [("deployments", "Deployment"), ("replicasets", "ReplicaSet")],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
    "batch/v1": [("jobs", "Job")],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler")],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy")],
}
DISCOVERY = {
    "/version": {"major": "1", "minor": "33", "gitVersion": "v1.33.0"},
    "/api": {"kind": "APIVersions", "versions": ["v1"]},
    "/api/v1": resources("v1", ("configmaps", "ConfigMap"), ("secrets", "Secret"), ("services", "Service"),
                         ("serviceaccounts", "ServiceAccount")),
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": gv.split("/")[0], "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
         "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]}} for gv in GROUPS]},
}
for gv, kinds in GROUPS.items():
    DISCOVERY["/apis/" + gv] = resources(gv, *kinds)
PLURALS = {r["name"] for d in DISCOVERY.values() for r in d.get("resources", [])}


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?")[0]
        body = DISCOVERY.get(path) or objects.get(path)
        if body is None and "/namespaces/" in path and path.rsplit("/", 1)[1] in PLURALS:
            items = [o for p, o in objects.items() if p.rsplit("/", 1)[0] == path]
            body = {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items}
        if body is None:
            self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                             "reason": "NotFound", "code": 404})
        else:
            self.reply(200, body)

    def do_write(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.reply(201, self.rfile.read(length) if length else b"{}")

    do_POST = do_PATCH = do_PUT = do_write


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(portfile, "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
