#!/usr/bin/env python3
"""Offline checks of FineServe's rendered Kubernetes manifests (scripts/validate_deploy.sh runs it).

For each rendered kustomization (NAME=FILE):
  1. Schema: every object against the Kubernetes JSON schema of its kind with kubernetes-validate
     (strict: unknown fields are errors); CRD objects (ServiceMonitor, LeaderWorkerSet) against the
     schemas in deploy/k8s/schemas/ (made by crd_to_schema.py from the CRDs), and the pod
     templates inside a LeaderWorkerSet as core/v1 PodTemplateSpecs. A kind with no schema fails.
  2. Consistency, which a schema cannot see: Services, ServiceMonitors, PDBs and HPAs point at
     objects and ports that exist in the same rendering; probes, security context, GPU shared
     memory and the termination grace period (>= preStop + the server's drain timeout + 1 s) of every
     serving pod; the HPA's metric is one the server exports (server/metrics.cpp) and that the
     prometheus-adapter rule serves.
Exits non-zero on any failure and ends with a line "N passed, M failed".
"""
import argparse
import json
import os
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

POD_TEMPLATE_MARKER = "x-fineserve-pod-template-spec"
LWS_NAME = "leaderworkerset.sigs.k8s.io/name"
LWS_INDEX = "leaderworkerset.sigs.k8s.io/worker-index"


class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok, where, what):
        if ok:
            self.passed += 1
        else:
            self.failed += 1
            print(f"FAIL {where}: {what}")
        return ok

    def ok(self, where, what):
        self.passed += 1
        print(f"ok   {where}: {what}")


def ref(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# ---- schemas ---------------------------------------------------------------------------------------

def crd_schema_file(schemas_dir, obj):
    group, _, version = obj["apiVersion"].rpartition("/")
    return os.path.join(schemas_dir, f"{obj['kind'].lower()}-{group}-{version}.json")


def pod_templates_by_marker(schema, value, path=""):
    """The (path, value) pairs of `value` that the schema marks as pod templates."""
    if not isinstance(schema, dict) or not isinstance(value, dict):
        return
    if schema.get(POD_TEMPLATE_MARKER):
        yield path, value
        return
    for key, sub in schema.get("properties", {}).items():
        if key in value:
            yield from pod_templates_by_marker(sub, value[key], f"{path}.{key}" if path else key)


def validate_schema(report, where, obj, k8s_version, schemas_dir):
    if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
        report.check(False, where, "not a Kubernetes object (no apiVersion/kind)")
        return
    crd_file = crd_schema_file(schemas_dir, obj)
    if os.path.exists(crd_file):
        with open(crd_file) as f:
            schema = json.load(f)
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
        for e in errors:
            report.check(False, f"{where} {ref(obj)}", f"{'.'.join(map(str, e.path))}: {e.message} ({os.path.basename(crd_file)})")
        bad = bool(errors)
        for path, template in pod_templates_by_marker(schema, obj):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "template"}, "template": template}
            try:
                kubernetes_validate.validate(wrapped, k8s_version, strict=True)
            except kubernetes_validate.ValidationError as e:
                bad = True
                report.check(False, f"{where} {ref(obj)}", f"{path}.{'.'.join(map(str, list(e.path)[1:]))}: {e.message}")
        if not bad:
            templates = [p for p, _ in pod_templates_by_marker(schema, obj)]
            report.ok(f"{where} {ref(obj)}", f"{obj['apiVersion']} schema from the CRD ({os.path.basename(crd_file)})"
                      + (f"; {', '.join(templates)} as core/v1 PodTemplateSpec" if templates else ""))
        return
    try:
        version = kubernetes_validate.validate(obj, k8s_version, strict=True)
        report.ok(f"{where} {ref(obj)}", f"{obj['apiVersion']} schema of Kubernetes {version} (strict)")
    except kubernetes_validate.ValidationError as e:
        report.check(False, f"{where} {ref(obj)}", f"{'.'.join(map(str, e.path))}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        report.check(False, f"{where} {ref(obj)}", f"{e.message}, and no CRD schema {crd_file}")


# ---- consistency -----------------------------------------------------------------------------------

def pods_of(obj):
    """(description, pod labels as the cluster will see them, pod spec) for each pod template."""
    kind, name = obj.get("kind"), obj["metadata"]["name"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        t = obj["spec"]["template"]
        yield f"{kind}/{name}", dict(t.get("metadata", {}).get("labels", {})), t["spec"]
    elif kind == "LeaderWorkerSet":
        lwt = obj["spec"]["leaderWorkerTemplate"]
        worker = lwt["workerTemplate"]
        leader = lwt.get("leaderTemplate", worker)
        # Labels the LWS controller adds to every pod of the set.
        for role, t, index in (("leader", leader, "0"), ("worker", worker, None)):
            labels = dict(t.get("metadata", {}).get("labels", {}))
            labels[LWS_NAME] = name
            if index is not None:
                labels[LWS_INDEX] = index
            yield f"{kind}/{name} {role}", labels, t["spec"]


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def flag_value(args, flag):
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def check_pod(report, where, spec, default_drain_s):
    psc = spec.get("securityContext", {})
    report.check(psc.get("runAsNonRoot") is True, where, "pod securityContext.runAsNonRoot must be true")
    report.check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where,
                 "pod securityContext.seccompProfile.type must be RuntimeDefault")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec.get("containers", []):
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        report.check(sc.get("allowPrivilegeEscalation") is False, cw, "allowPrivilegeEscalation must be false")
        report.check(sc.get("readOnlyRootFilesystem") is True, cw, "readOnlyRootFilesystem must be true")
        report.check("ALL" in sc.get("capabilities", {}).get("drop", []), cw, "capabilities must drop ALL")
        res = c.get("resources", {})
        report.check("memory" in res.get("requests", {}) and "memory" in res.get("limits", {}), cw,
                     "memory requests and limits must be set")
        gpus = res.get("limits", {}).get("nvidia.com/gpu")
        if "nvidia.com/gpu" in res.get("requests", {}):
            report.check(str(res["requests"]["nvidia.com/gpu"]) == str(gpus), cw,
                         "nvidia.com/gpu requests must equal its limits")
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        for m in mounts.values():
            report.check(m["name"] in volumes, cw, f"volumeMount {m['mountPath']} names no volume '{m['name']}'")
            v = volumes.get(m["name"], {})
            if "persistentVolumeClaim" in v:
                report.check(m.get("readOnly") is True and v["persistentVolumeClaim"].get("readOnly") is True, cw,
                             f"the model volume at {m['mountPath']} must be mounted read-only")
        if gpus is not None:
            shm = mounts.get("/dev/shm")
            report.check(shm is not None and volumes.get(shm["name"], {}).get("emptyDir", {}).get("medium") == "Memory",
                         cw, "a GPU container needs a memory-backed emptyDir at /dev/shm (NCCL)")
        args = [str(a) for a in c.get("args", [])]
        if not args or args[0] != "serve":
            continue
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        serves_http = "http" in ports
        if serves_http:
            report.check(flag_value(args, "--port") in (None, str(ports["http"])), cw,
                         f"--port {flag_value(args, '--port')} is not the http containerPort {ports['http']}")
            report.check(flag_value(args, "--host") == "0.0.0.0", cw, "--host must be 0.0.0.0 in a pod")
            for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
                get = c.get(probe, {}).get("httpGet", {})
                report.check(get.get("path") == path, cw, f"{probe} must GET {path}")
                port = get.get("port")
                report.check(port in ports or port in ports.values(), cw, f"{probe} port {port!r} is not a container port")
        drain = flag_value(args, "--drain-timeout")
        drain_s = float(drain) if drain is not None else default_drain_s
        pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pre_s = float(pre[1]) if len(pre) == 2 and pre[0] == "sleep" else 0.0
        grace = spec.get("terminationGracePeriodSeconds", 30)
        # The server exits within its drain timeout + 1 s of SIGTERM (docs/deploy.md).
        report.check(grace >= drain_s + pre_s + 1, cw, f"terminationGracePeriodSeconds {grace} must be at least preStop "
                                                       f"{pre_s:g} s + drain timeout {drain_s:g} s + 1 s")


def check_consistency(report, name, objs, default_drain_s, exported_metrics, adapter_metrics):
    by_ref = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    pods = [p for o in objs for p in pods_of(o)]
    where = name
    for o in objs:
        if o["kind"] == "Deployment":
            report.check(selects(o["spec"]["selector"].get("matchLabels"), o["spec"]["template"]["metadata"].get("labels", {})),
                         f"{where} {ref(o)}", "spec.selector must match the pod template's labels")
        for pw, _, spec in pods_of(o):
            check_pod(report, f"{where} {pw}", spec, default_drain_s)
            for v in spec.get("volumes", []):
                if "persistentVolumeClaim" in v:
                    claim = v["persistentVolumeClaim"]["claimName"]
                    report.check(("PersistentVolumeClaim", claim) in by_ref, f"{where} {pw}",
                                 f"volume {v['name']} claims PVC {claim}, which this rendering does not define")
    for o in objs:
        w = f"{where} {ref(o)}"
        if o["kind"] == "Service":
            matched = [(pw, spec) for pw, labels, spec in pods if selects(o["spec"].get("selector"), labels)]
            if report.check(bool(matched), w, f"selector {o['spec'].get('selector')} matches no pod template"):
                names = {p.get("name") for _, spec in matched for c in spec["containers"] for p in c.get("ports", [])}
                for p in o["spec"]["ports"]:
                    tp = p.get("targetPort", p["port"])
                    report.check(not isinstance(tp, str) or tp in names, w, f"targetPort {tp} is no container port of {[m[0] for m in matched]}")
                report.ok(w, f"selects {', '.join(m[0] for m in matched)}")
        elif o["kind"] == "ServiceMonitor":
            svcs = [s for s in objs if s["kind"] == "Service"
                    and selects(o["spec"]["selector"].get("matchLabels"), s["metadata"].get("labels", {}))]
            if report.check(bool(svcs), w, "selector matches no Service"):
                svc_ports = {p.get("name") for s in svcs for p in s["spec"]["ports"]}
                for e in o["spec"]["endpoints"]:
                    report.check(e.get("port") in svc_ports, w, f"endpoint port {e.get('port')} is not a port of {[ref(s) for s in svcs]}")
                    report.check(e.get("path") == "/metrics", w, "endpoint path must be /metrics")
                report.ok(w, f"scrapes {', '.join(ref(s) for s in svcs)}")
        elif o["kind"] == "PodDisruptionBudget":
            matched = [pw for pw, labels, _ in pods if selects(o["spec"]["selector"].get("matchLabels"), labels)]
            if report.check(bool(matched), w, "selector matches no pod template"):
                report.ok(w, f"covers {', '.join(matched)}")
        elif o["kind"] == "HorizontalPodAutoscaler":
            t = o["spec"]["scaleTargetRef"]
            target = by_ref.get((t["kind"], t["name"]))
            report.check(target is not None and target["apiVersion"] == t.get("apiVersion"), w,
                         f"scaleTargetRef {t.get('apiVersion')} {t['kind']}/{t['name']} is not in this rendering")
            for m in o["spec"].get("metrics", []):
                if m["type"] == "Pods":
                    metric = m["pods"]["metric"]["name"]
                    report.check(metric in exported_metrics, w, f"metric {metric} is not exported by the server")
                    report.check(metric in adapter_metrics, w, f"metric {metric} is not served by the prometheus-adapter rule")
            if target is not None:
                report.ok(w, f"scales {t['kind']}/{t['name']} on {[m.get('pods', {}).get('metric', {}).get('name', m['type']) for m in o['spec'].get('metrics', [])]}")


# ---- prometheus-adapter ----------------------------------------------------------------------------

def adapter_rules(report, config_path, values_path, exported_metrics):
    with open(config_path) as f:
        rules = yaml.safe_load(f)["rules"]
    with open(values_path) as f:
        values = yaml.safe_load(f)
    where = os.path.relpath(config_path)
    report.check(values.get("rules", {}).get("custom") == rules, where,
                 f"the rules in {os.path.relpath(values_path)} (rules.custom) differ from config.yaml's")
    served = set()
    for r in rules:
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", r["seriesQuery"]).group(1)
        report.check(series in exported_metrics, where, f"seriesQuery metric {series} is not exported by the server")
        name = r.get("name", {})
        as_name = re.sub(name["matches"], name["as"], series) if "matches" in name and name.get("as") else series
        report.check(set(r.get("resources", {}).get("overrides", {})) >= {"namespace", "pod"}, where,
                     "the rule must map the namespace and pod labels (a Pods metric for the HPA)")
        report.check("<<.Series>>" in r.get("metricsQuery", "") and "<<.GroupBy>>" in r.get("metricsQuery", ""), where,
                     "metricsQuery must use <<.Series>> and group by <<.GroupBy>>")
        served.add(as_name)
    report.ok(where, f"serves {sorted(served)} (same rules in {os.path.relpath(values_path)})")
    return served


def exported_metric_names(metrics_cpp):
    with open(metrics_cpp) as f:
        return set(re.findall(r'"(fineserve_[a-z0-9_]+)"', f.read()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kubernetes-version", required=True)
    ap.add_argument("--schemas", required=True, help="folder of CRD schemas (deploy/k8s/schemas)")
    ap.add_argument("--server-config", required=True, help="configs/server.json (the default drain timeout)")
    ap.add_argument("--metrics-source", required=True, help="server/metrics.cpp (the exported metric names)")
    ap.add_argument("--adapter-config", required=True)
    ap.add_argument("--adapter-values", required=True)
    ap.add_argument("rendered", nargs="+", help="NAME=FILE: a kustomization's rendered output")
    args = ap.parse_args()

    report = Report()
    with open(args.server_config) as f:
        default_drain_s = float(json.load(f)["drain_timeout_s"])
    exported = exported_metric_names(args.metrics_source)
    report.check(bool(exported), args.metrics_source, "no fineserve_ metric names found")
    served = adapter_rules(report, args.adapter_config, args.adapter_values, exported)
    for item in args.rendered:
        name, _, path = item.partition("=")
        with open(path) as f:
            objs = [o for o in yaml.safe_load_all(f) if o]
        report.check(bool(objs), name, "the rendering is empty")
        for o in objs:
            validate_schema(report, name, o, args.kubernetes_version, args.schemas)
        try:
            check_consistency(report, name, objs, default_drain_s, exported, served)
        except (KeyError, TypeError, ValueError) as e:  # a malformed object the schema step reported already
            report.check(False, name, f"consistency checks stopped at a malformed object: {e!r}")
    print(f"{report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
