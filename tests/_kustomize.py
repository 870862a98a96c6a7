"""Render the Kustomize folders under deploy/k8s without a kustomize binary (none is
installed by `make setup`): the subset of Kustomize's built-ins those folders use —
``resources`` (files and folders), ``configMapGenerator`` (``files``, without the name
hash), ``patches`` (inline JSON 6902 with a kind/name target), ``images`` and
``namespace``. Any other field is refused, so a manifest never silently renders
differently here; ``tests/test_deploy_manifests.py`` compares the result with
``kubectl kustomize`` where kubectl is installed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "images",
    "patches",
    "configMapGenerator",
    "generatorOptions",
}
# Kinds without a namespace that Kustomize's namespace transformer leaves alone.
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
}


class KustomizeError(ValueError):
    """A kustomization this renderer cannot render exactly as Kustomize would."""


def render(folder: Path) -> list[dict[str, Any]]:
    """The resources ``folder``'s kustomization.yaml produces, in load order."""
    path = folder / "kustomization.yaml"
    spec = yaml.safe_load(path.read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{path}: fields {sorted(unknown)} are not rendered here")
    docs: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        target = (folder / entry).resolve()
        if target.is_dir():
            docs += render(target)
        elif target.is_file():
            docs += [d for d in yaml.safe_load_all(target.read_text()) if d is not None]
        else:
            raise KustomizeError(f"{path}: resource {entry} does not exist")
    docs += _generate(folder, spec)
    for patch in spec.get("patches", []):
        _patch(docs, patch, path)
    for image in spec.get("images", []):
        _set_image(docs, image)
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc.setdefault("metadata", {})["namespace"] = spec["namespace"]
    return docs


def _generate(folder: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    gens = spec.get("configMapGenerator", [])
    if gens and not spec.get("generatorOptions", {}).get("disableNameSuffixHash"):
        raise KustomizeError("configMapGenerator: only disableNameSuffixHash: true is rendered")
    out = []
    for gen in gens:
        if set(gen) - {"name", "files", "options"} or set(gen.get("options", {})) - {"labels"}:
            raise KustomizeError(f"configMapGenerator {gen['name']}: unsupported fields")
        data = {}
        for entry in gen["files"]:
            if "=" in entry:
                raise KustomizeError(f"configMapGenerator: key=path form ({entry})")
            data[Path(entry).name] = (folder / entry).read_text()
        meta: dict[str, Any] = {"name": gen["name"]}
        if gen.get("options", {}).get("labels"):
            meta["labels"] = dict(gen["options"]["labels"])
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return out


def _patch(docs: list[dict[str, Any]], patch: dict[str, Any], path: Path) -> None:
    target = patch.get("target") or {}
    if set(patch) != {"target", "patch"} or set(target) - {"kind", "name"}:
        raise KustomizeError(f"{path}: only inline patches with a kind/name target")
    ops = yaml.safe_load(patch["patch"])
    if not isinstance(ops, list):
        raise KustomizeError(f"{path}: only JSON 6902 patches (a list of operations)")
    hits = [
        d
        for d in docs
        if d["kind"] == target.get("kind", d["kind"])
        and d["metadata"]["name"] == target.get("name", d["metadata"]["name"])
    ]
    if not hits:
        raise KustomizeError(f"{path}: patch target {target} matches no resource")
    for doc in hits:
        for op in ops:
            _apply(doc, op)


def _apply(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """One RFC 6902 add/replace/remove operation."""
    keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
    parent: Any = doc
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last = keys[-1]
    kind = op["op"]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[index]
        else:
            raise KustomizeError(f"JSON patch op {kind} is not rendered here")
        return
    if kind in ("replace", "remove") and last not in parent:
        raise KustomizeError(f"JSON patch {kind} {op['path']}: no such field")
    if kind in ("add", "replace"):
        parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del parent[last]
    else:
        raise KustomizeError(f"JSON patch op {kind} is not rendered here")


def _set_image(docs: list[dict[str, Any]], image: dict[str, Any]) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise KustomizeError(f"images: {image} (digest and other fields are not rendered)")

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    for container in value:
                        name, _, tag = container["image"].partition(":")
                        if name == image["name"]:
                            name = image.get("newName", name)
                            tag = image.get("newTag", tag)
                            container["image"] = f"{name}:{tag}" if tag else name
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(docs)
