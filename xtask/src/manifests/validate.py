"""Validates rendered Kubernetes manifests; run by `cargo xtask manifests` in its venv.

    validate.py --kubernetes-version 1.37.0 [...] --crds FILE [...] [--expect TEXT [...]] FILE...

Every object of every FILE (multi-document YAML) is checked against the OpenAPI schemas of each
pinned Kubernetes version (kubernetes-validate, strict: unknown fields are errors). An object of a
kind one of the --crds files defines is checked against that CRD's openAPIV3Schema instead
(kubernetes-validate has no CRD support); an object of a kind neither knows is an error, never a
warning. Then a few rules the mesh relies on and no schema says (the DaemonSet's rollout and
handover, the configuration copies). Each problem is one line naming the file, the object and
the field; the exit status is 1 when there is any.

With --expect the files must hold problems, one whose line contains each TEXT: the run fails
otherwise (the canary that shows that each kind of check still refuses what it must).
"""

import argparse
import copy
import re
import sys

import jsonschema
import yaml
from kubernetes_validate import utils as kv
from referencing import Registry, Resource


def load(path):
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def describe(obj):
    meta = obj.get("metadata") or {}
    name = meta.get("name", "?")
    if meta.get("namespace"):
        name = f"{meta['namespace']}/{name}"
    return f"{obj.get('kind', '?')} {name}"


def field_path(path):
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the object)"


def crd_schemas(paths):
    """{(group, version, kind): JSON Schema} from the CRD files."""
    schemas = {}
    for path in paths:
        for crd in load(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                schema = to_json_schema(version["schema"]["openAPIV3Schema"])
                schemas[(spec["group"], version["name"], spec["names"]["kind"])] = schema
    return schemas


def to_json_schema(node):
    """A structural OpenAPI v3 schema as JSON Schema: the Kubernetes extensions made explicit."""
    node = copy.deepcopy(node)

    def walk(n):
        if not isinstance(n, dict):
            return
        if n.pop("x-kubernetes-int-or-string", False):
            n.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        # Unknown fields are kept (not pruned) there: JSON Schema's default already allows them.
        n.pop("x-kubernetes-preserve-unknown-fields", None)
        if n.pop("nullable", False) and "type" in n:
            n["type"] = [n["type"], "null"]
        for key in ("properties",):
            for child in (n.get(key) or {}).values():
                walk(child)
        for key in ("items", "additionalProperties"):
            walk(n.get(key))
        for key in ("anyOf", "oneOf", "allOf"):
            for child in n.get(key) or []:
                walk(child)

    walk(node)
    return node


def validate_object(obj, versions, crds):
    """Problems of one object against the schemas, as (field, message)."""
    api_version = obj.get("apiVersion", "")
    group, _, version = api_version.rpartition("/")
    key = (group, version, obj.get("kind"))
    if key in crds:
        validator = jsonschema.Draft202012Validator(crds[key])
        return [
            (field_path(e.absolute_path), f"{e.message} (against the CRD)")
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))
        ]
    problems = []
    for k8s in versions:
        try:
            for e in k8s_errors(obj, k8s):
                problems.append((field_path(e.absolute_path), f"{e.message} (Kubernetes {k8s})"))
        except kv.SchemaNotFoundError as e:
            problems.append(("apiVersion/kind", e.message))
    return problems


def k8s_errors(obj, k8s):
    """Every error of `obj` against Kubernetes `k8s`'s strict schema (kubernetes-validate's
    schemas and lookup, as its validate() does, but all errors rather than the first)."""
    version = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(k8s)][-1]
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", obj["apiVersion"])
    schema_dir = f"v{version}-local-strict"
    try:
        schema = kv.schema_contents(
            f"kubernetes-json-schema/{schema_dir}/{obj['kind'].lower()}-{group_version}.json", k8s)
    except FileNotFoundError:
        raise kv.SchemaNotFoundError(version=kv.major_minor(k8s), kind=obj["kind"],
                                     api_version=obj["apiVersion"])
    definitions = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", k8s)
    registry = Resource.from_contents(schema) @ Registry()
    registry = Resource.from_contents(definitions) @ registry
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))


def mesh_rules(objects):
    """What the mesh relies on beyond the schemas, as (object, field, message)."""
    problems = []
    config = {}
    for obj in objects:
        if obj.get("kind") == "ConfigMap" and "agent.yaml" in (obj.get("data") or {}):
            config[obj["metadata"]["name"]] = yaml.safe_load(obj["data"]["agent.yaml"])
    for obj in objects:
        if obj.get("kind") != "DaemonSet":
            continue
        what = describe(obj)
        pod = obj["spec"]["template"]["spec"]
        # Every mount names a volume of the pod (the API server would refuse the pod).
        volume_names = {v["name"] for v in pod.get("volumes", [])}
        for kind in ("initContainers", "containers"):
            for i, c in enumerate(pod.get(kind, [])):
                for j, m in enumerate(c.get("volumeMounts", [])):
                    if m.get("name") not in volume_names:
                        problems.append((what, f"spec.template.spec.{kind}[{i}].volumeMounts[{j}]",
                                         f"no volume named {m.get('name')!r} in the pod"))
        if obj["metadata"]["name"] != "mesh-agent":
            continue
        names = [c["name"] for c in pod.get("containers", [])]
        if "mesh-agent" not in names:
            continue  # the uninstall variant: no agent, no rollout rules
        rolling = (obj["spec"].get("updateStrategy") or {}).get("rollingUpdate") or {}
        if rolling.get("maxSurge") != 1 or rolling.get("maxUnavailable") != 0:
            problems.append((what, "spec.updateStrategy.rollingUpdate",
                             "must be maxSurge 1, maxUnavailable 0: the new agent takes over "
                             "from the running one (docs/operations.md)"))
        for i, c in enumerate(pod.get("containers", []) + pod.get("initContainers", [])):
            if c.get("ports"):
                problems.append((what, f"containers[{i}].ports",
                                 "no containerPorts with hostNetwork: they become host ports "
                                 "and the surge pod could not be scheduled"))
        host_paths = {v["hostPath"]["path"] for v in pod.get("volumes", []) if "hostPath" in v}
        for needed in ("/sys/fs/bpf", "/run/mesh-agent"):
            if needed not in host_paths:
                problems.append((what, "spec.template.spec.volumes",
                                 f"no hostPath {needed}: the old and the new agent must share it"))
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        config_name = ((volumes.get("config") or {}).get("configMap") or {}).get("name")
        agent = config.get(config_name)
        if agent is None:
            problems.append((what, "spec.template.spec.volumes[config]", f"no ConfigMap {config_name} with agent.yaml"))
            continue
        drain = (agent.get("lifecycle") or {}).get("drain_timeout_secs", 300)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if isinstance(grace, int) and isinstance(drain, int) and grace <= drain:
            problems.append((what, "spec.template.spec.terminationGracePeriodSeconds",
                             f"{grace} is not above lifecycle.drain_timeout_secs ({drain}): the "
                             "kubelet would kill a draining agent"))
    return problems


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kubernetes-version", action="append", required=True)
    parser.add_argument("--crds", action="append", default=[])
    parser.add_argument("--expect", action="append", default=[])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    crds = crd_schemas(args.crds)
    total = 0
    problems = []
    for path in args.files:
        objects = load(path)
        total += len(objects)
        for obj in objects:
            for field, message in validate_object(obj, args.kubernetes_version, crds):
                problems.append(f"{path}: {describe(obj)}: {field}: {message}")
        for what, field, message in mesh_rules(objects):
            problems.append(f"{path}: {what}: {field}: {message}")
    if args.expect:
        missed = [text for text in args.expect if not any(text in line for line in problems)]
        for text in missed:
            print(f"the canary {', '.join(args.files)} was not refused for {text!r}: the "
                  "validator accepts what it must refuse", file=sys.stderr)
        if missed:
            for line in problems:
                print(f"  (it found: {line})", file=sys.stderr)
            return 1
        print(f"canary refused as it must ({len(problems)} problems), e.g. {problems[0]}")
        return 0
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return 1
    print(f"{total} objects in {len(args.files)} files valid against Kubernetes "
          f"{', '.join(args.kubernetes_version)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
