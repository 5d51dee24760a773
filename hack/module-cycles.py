#!/usr/bin/env python3
"""Import cycles between the top-level modules of each crate.

A module of a crate is a file `src/<name>.rs` or folder `src/<name>/`; it depends on every
other top-level module it names as `crate::<name>` (in `use` or in paths). Prints each
cycle (a strongly connected set of more than one module) and exits 1 if there is any.

    hack/module-cycles.py            # every crate under crates/
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
CRATE_REF = re.compile(r"\bcrate::(?:\{([^}]*)\}|([a-z_][a-z0-9_]*))")


def modules(src):
    found = {}
    for path in sorted(src.rglob("*.rs")):
        rel = path.relative_to(src)
        top = rel.parts[0].removesuffix(".rs")
        if top in ("lib", "main"):
            continue
        found.setdefault(top, []).append(path)
    return found


def strip_tests(text):
    # Test modules may reach anywhere; they are not part of the dependency structure.
    cut = text.find("#[cfg(test)]")
    return text if cut < 0 else text[:cut]


def edges(mods):
    graph = {m: set() for m in mods}
    for m, files in mods.items():
        for f in files:
            if f.name == "tests.rs":
                continue
            text = strip_tests(f.read_text())
            for group, single in CRATE_REF.findall(text):
                names = [single] if single else [
                    n.strip().split("::")[0].split(" ")[0] for n in group.split(",")
                ]
                for n in names:
                    if n in mods and n != m:
                        graph[m].add(n)
    return graph


def cycles(graph):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    failed = False
    for src in sorted(ROOT.glob("crates/*/src")):
        crate = src.parent.name
        found = cycles(edges(modules(src)))
        for scc in found:
            failed = True
            print(f"{crate}: cycle between {', '.join(scc)}")
        if not found:
            print(f"{crate}: no cycle")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
