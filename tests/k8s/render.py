"""What `kustomize build` does with the features k8s/ uses, so tests render without the tool:
resources (files and directories with a kustomization.yaml), namespace, labels (without
selectors), and patches that are strategic-merge documents matched by kind and name
(containers and other named lists merge by name; a null value removes the key; a document
with `$patch: delete` removes the resource)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]
NAMESPACED_EXCEPT = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


def _merge(base: Any, patch: Any) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        merged = {x["name"]: x for x in base}
        for x in patch:
            merged[x["name"]] = _merge(merged[x["name"]], x) if x["name"] in merged else copy.deepcopy(x)
        return list(merged.values())
    return copy.deepcopy(patch)


def _docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(directory: Path) -> list[Doc]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - {"apiVersion", "kind", "resources", "namespace", "labels", "patches"}
    if unknown:
        raise ValueError(f"{directory}: kustomization fields this renderer does not know: {sorted(unknown)}")
    docs: list[Doc] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        docs += render(target) if target.is_dir() else _docs(target)
    for patch in spec.get("patches", []):
        for p in _docs(directory / patch["path"]):
            matches = [i for i, d in enumerate(docs)
                       if d["kind"] == p["kind"] and d["metadata"]["name"] == p["metadata"]["name"]]  # fmt: skip
            if len(matches) != 1:
                raise ValueError(f"patch {p['kind']}/{p['metadata']['name']} matches {len(matches)} resources")
            if p.get("$patch") == "delete":
                del docs[matches[0]]
            else:
                docs[matches[0]] = _merge(docs[matches[0]], p)
    for group in spec.get("labels", []):
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])
    if "namespace" in spec:
        for d in docs:
            if d["kind"] not in NAMESPACED_EXCEPT:
                d["metadata"]["namespace"] = spec["namespace"]
    return docs
