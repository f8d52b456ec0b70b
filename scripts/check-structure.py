#!/usr/bin/env python3
"""The house's rules, checked (part of `make lint`):

1. No service depends on another service: the crates a service binary is built from
   (`cargo metadata`) are libraries (`shared`, `model`, `admin`), never `ingest`, `normalizer`,
   `deliverer` or `poller`. (The test harness and the bench may depend on every service.)
2. The model stays pure: `model` depends on no runtime crate (tokio, async-nats, axum, hyper,
   reqwest, prometheus, backon).
3. No import circle inside a crate: the modules of each workspace crate's `src/` (a file, or a
   folder with its `mod.rs`), linked by the `crate::<module>` paths their code names (in `use`
   lines and inline), must form no cycle. Comments, doc comments and `#[cfg(test)] mod tests`
   blocks are left out: a test may look at anything.

Prints each broken rule with what ties it and exits 1; exits 0 and says what it checked otherwise.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

SERVICES = {"ingest", "normalizer", "deliverer", "poller"}
RUNTIME = {"tokio", "async-nats", "axum", "hyper", "hyper-util", "reqwest", "prometheus", "backon"}
# Crates allowed to depend on services: they test or measure them.
HARNESSES = {"integration-tests", "bench"}


def metadata(root: pathlib.Path) -> dict:
    out = subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--no-deps", "--locked", "--offline"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def service_edges(meta: dict) -> list[str]:
    members = {p["name"] for p in meta["packages"]}
    broken = []
    for package in meta["packages"]:
        if package["name"] in HARNESSES:
            continue
        for dep in package["dependencies"]:
            if dep["name"] in SERVICES and dep["name"] in members and dep.get("kind") != "dev":
                broken.append(f"{package['name']} depends on the service {dep['name']}")
    return broken


def impure_model(meta: dict) -> list[str]:
    return [
        f"model depends on the runtime crate {dep['name']}"
        for package in meta["packages"]
        if package["name"] == "model"
        for dep in package["dependencies"]
        if dep["name"] in RUNTIME and dep.get("kind") != "dev"
    ]


COMMENT = re.compile(r"//[^\n]*")
BLOCK_COMMENT = re.compile(r"/\*.*?\*/", re.S)
STRING = re.compile(r'"(?:\\.|[^"\\])*"')
TEST_MOD = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{")
USE_BLOCK = re.compile(r"\buse\s+crate::\{")
CRATE_PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")


def strip_test_modules(text: str) -> str:
    """Removes every `#[cfg(test)] mod name { ... }` block (brace-matched)."""
    while True:
        m = TEST_MOD.search(text)
        if not m:
            return text
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        text = text[: m.start()] + text[i:]


def referenced_modules(text: str) -> set[str]:
    """The top-level modules of the crate that `text` names through `crate::`."""
    names = set(CRATE_PATH.findall(text))
    # `use crate::{a::X, b};`: the first segment of each item of the brace list.
    for m in USE_BLOCK.finditer(text):
        depth, i, item, items = 1, m.end(), "", []
        while i < len(text) and depth:
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            if depth == 1 and c == ",":
                items.append(item)
                item = ""
            elif depth >= 1:
                item += c
            i += 1
        items.append(item)
        for it in items:
            first = re.match(r"\s*([a-z_][a-z0-9_]*)", it)
            if first and first.group(1) not in ("self",):
                names.add(first.group(1))
    return names


def crate_modules(src: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """Top-level module name -> its files (`a.rs`, or every file under `a/`)."""
    modules: dict[str, list[pathlib.Path]] = {}
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix == ".rs" and f.stem not in ("lib", "main"):
            modules.setdefault(f.stem, []).append(f)
        elif f.is_dir() and f.name != "bin":
            modules.setdefault(f.name, []).extend(sorted(f.rglob("*.rs")))
    return modules


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def module_circles(root: pathlib.Path, meta: dict) -> tuple[int, list[str]]:
    broken, crates = [], 0
    for package in meta["packages"]:
        src = pathlib.Path(package["manifest_path"]).parent / "src"
        if not src.is_dir():
            continue
        crates += 1
        modules = crate_modules(src)
        graph: dict[str, set[str]] = {}
        why: dict[tuple[str, str], str] = {}
        for name, files in modules.items():
            for f in files:
                text = f.read_text(encoding="utf-8")
                text = BLOCK_COMMENT.sub("", COMMENT.sub("", STRING.sub('""', text)))
                text = strip_test_modules(text)
                for other in referenced_modules(text) & modules.keys():
                    if other != name:
                        graph.setdefault(name, set()).add(other)
                        why.setdefault((name, other), str(f.relative_to(root)))
        for comp in cycles(graph):
            ties = [
                f"    {why[(a, b)]} -> {b}"
                for a in comp
                for b in sorted(graph.get(a, ()))
                if b in comp
            ]
            broken.append(f"import circle in {package['name']}: {', '.join(comp)}\n" + "\n".join(ties))
    return crates, broken


def main() -> int:
    root = pathlib.Path(__file__).resolve().parent.parent
    meta = metadata(root)
    broken = service_edges(meta) + impure_model(meta)
    crates, circles = module_circles(root, meta)
    broken += circles
    for line in broken:
        print(f"check-structure: {line}", file=sys.stderr)
    if broken:
        return 1
    print(
        f"check-structure: {len(meta['packages'])} crates, no service depends on another, model "
        f"has no runtime dependency; "
        f"{crates} crates' modules, no import circle"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
