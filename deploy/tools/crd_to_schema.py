#!/usr/bin/env python3
"""Turns a CustomResourceDefinition into the JSON schema validate_manifests.py checks its objects with.

kubernetes-validate ships schemas for the built-in kinds only; the CRDs FineServe's manifests use
(ServiceMonitor, LeaderWorkerSet) get theirs from the CRD's own openAPIV3Schema, made strict the
way `kubectl apply` (field validation Strict) is: an object schema that lists its properties and
does not preserve unknown fields rejects any other property. Descriptions are dropped to keep the
file small. A field given with --pod-template PATH (dotted, e.g.
spec.leaderWorkerTemplate.workerTemplate) is replaced by a marker, and validate_manifests.py checks
it as a core/v1 PodTemplateSpec with kubernetes-validate instead of with the CRD's copy of it.

  crd_to_schema.py CRD.yaml VERSION SOURCE [--pod-template PATH]... > SCHEMA.json
"""
import argparse
import json
import sys

import yaml

POD_TEMPLATE_MARKER = "x-fineserve-pod-template-spec"


def strict(node):
    if isinstance(node, dict):
        node.pop("description", None)
        for value in node.values():
            strict(value)
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
    elif isinstance(node, list):
        for value in node:
            strict(value)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("crd")
    ap.add_argument("version")
    ap.add_argument("source", help="where the CRD came from (recorded in the schema)")
    ap.add_argument("--pod-template", action="append", default=[])
    args = ap.parse_args()
    with open(args.crd) as f:
        crd = next(d for d in yaml.safe_load_all(f) if d)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == args.version)
    schema = version["schema"]["openAPIV3Schema"]
    for path in args.pod_template:
        node = schema
        keys = path.split(".")
        for key in keys[:-1]:
            node = node["properties"][key]
        node["properties"][keys[-1]] = {"type": "object", POD_TEMPLATE_MARKER: True}
    strict(schema)
    schema["$comment"] = f"{crd['spec']['group']}/{args.version} {crd['spec']['names']['kind']} from {args.source}"
    json.dump(schema, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
