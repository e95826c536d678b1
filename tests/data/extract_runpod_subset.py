"""Cut the parts of RunPod's REST v2 OpenAPI schema that `higgs-runpod deploy` uses.

Usage (from the repository root):
    python tests/data/extract_runpod_subset.py FULL.json > tests/data/runpod-v2-subset.json

Keeps the operations below (request body and success/error response schemas only) and
every component schema they reference, without descriptions and examples.
"""

import json
import sys

OPERATIONS = {
    "/v2/templates": ["get", "post"],
    "/v2/templates/{id}": ["patch"],
    "/v2/serverless": ["get", "post"],
    "/v2/serverless/{id}": ["patch"],
    "/v2/network-volumes": ["get", "post"],
}
DROP = {"description", "example", "examples", "summary", "tags", "headers"}


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k not in DROP}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def main(path):
    with open(path) as handle:
        full = json.load(handle)
    paths = {}
    for route, methods in OPERATIONS.items():
        paths[route] = {}
        for method in methods:
            op = full["paths"][route][method]
            kept = {"operationId": op["operationId"]}
            if "requestBody" in op:
                kept["requestBody"] = op["requestBody"]
            kept["responses"] = {
                code: {"content": {"application/json": answer["content"]["application/json"]}}
                for code, answer in op["responses"].items()
                if code.startswith("2") and "content" in answer
            }
            paths[route][method] = strip(kept)
    schemas, todo = {}, ["#/components/schemas/ErrorResponse", *refs(paths)]
    while todo:
        name = todo.pop().rsplit("/", 1)[1]
        if name not in schemas:
            schemas[name] = strip(full["components"]["schemas"][name])
            todo.extend(refs(schemas[name]))
    subset = {
        "x-source": (
            "Subset of RunPod's public REST API v2 OpenAPI schema "
            f"({full['info']['title']} {full['info']['version']}, server "
            f"{full['servers'][0]['url']}), cut by tests/data/extract_runpod_subset.py: only "
            "the operations `higgs-runpod deploy` sends and the schemas they reference."
        ),
        "openapi": full["openapi"],
        "info": full["info"],
        "paths": paths,
        "components": {"schemas": dict(sorted(schemas.items()))},
    }
    json.dump(subset, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
