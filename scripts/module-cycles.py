#!/usr/bin/env python3
"""Checks that a crate's modules import each other without cycles.

Usage: scripts/module-cycles.py CRATE_SRC_DIR [-v]   (e.g. keyd/src; -v prints every edge)

Nodes are the crate's module files (src/bin is left out). An edge a -> b means a names b: a
`crate::b::...` path (the longest module prefix that exists), a `super::...` path, a
`self::child::...` path, or a declared child module by its bare name (`aws::AwsKms`). A
`mod child;` declaration alone is not an edge, and neither is anything under `#[cfg(test)] mod
tests`. Exits 1 and lists every cycle (strongly connected component) when there is one."""
import os, re, sys
root = sys.argv[1]
mods = {}
for dp, _, fs in os.walk(root):
    for f in fs:
        if not f.endswith('.rs'): continue
        p = os.path.join(dp, f); rel = os.path.relpath(p, root)[:-3]
        if rel.startswith('bin/') or rel in ('main',): continue
        parts = rel.split('/')
        if parts[-1] == 'mod': parts = parts[:-1]
        if parts == ['lib']: parts = []
        mods['::'.join(parts)] = p
def strip(src):
    src = re.sub(r'//[^\n]*', '', src)
    # drop #[cfg(test)] mod tests { ... } roughly: cut at '#[cfg(test)]\nmod tests'
    i = src.find('#[cfg(test)]\nmod tests')
    if i >= 0: src = src[:i]
    return src
edges = {m: set() for m in mods}
for m, p in mods.items():
    src = strip(open(p).read())
    # expand use crate::{a, b::c}
    for mt in re.finditer(r'crate::((?:\{[^;]*?\}|[A-Za-z_][\w:]*))', src):
        txt = mt.group(1)
        cands = []
        if txt.startswith('{'):
            for item in re.split(r'[,{}\s]+', txt):
                if item: cands.append(item)
        else:
            cands.append(txt)
        for c in cands:
            segs = [s for s in c.split('::') if s and s != 'self']
            best = None
            for k in range(len(segs), 0, -1):
                cand = '::'.join(segs[:k])
                if cand in mods: best = cand; break
            if best is not None and best != m:
                edges[m].add(best)
    base = m.split('::')
    supers = []
    for mt in re.finditer(r'\bsuper::(\{[^;]*?\}|[A-Za-z_][\w:]*)', src):
        t = mt.group(1)
        if t.startswith('{'):
            supers += [i for i in re.split(r'[,{}\s]+', t) if i]
        else:
            supers.append(t)
    for sp in supers:
        segs = base[:-1] + sp.split('::')
        for k in range(len(segs), 0, -1):
            cand = '::'.join(segs[:k])
            if cand in mods:
                if cand != m: edges[m].add(cand)
                break
    for mt in re.finditer(r'\bself::([A-Za-z_][\w:]*)', src):
        segs = base + mt.group(1).split('::')
        for k in range(len(segs), len(base), -1):
            cand = '::'.join(segs[:k])
            if cand in mods:
                edges[m].add(cand); break
    # a parent naming a declared child module by its bare name (`aws::AwsKms`)
    for child in re.findall(r'^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;', src, re.M):
        cm = '::'.join(base + [child]) if m else child
        if cm in mods and re.search(r'(?<![\w:])' + child + r'::', src.replace('mod ' + child, '')):
            edges[m].add(cm)
        # `pub use child::...` also counts (caught above via the bare name)
# drop edges to parent module (mod.rs declaring children is fine) — parent->child is declared via `mod`
# Tarjan
idx = {}; low = {}; st = []; on = set(); sccs = []; c = [0]
sys.setrecursionlimit(10000)
def sc(v):
    idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
    for w in edges[v]:
        if w not in idx: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], idx[w])
    if low[v] == idx[v]:
        comp = []
        while True:
            w = st.pop(); on.discard(w); comp.append(w)
            if w == v: break
        sccs.append(comp)
for v in mods:
    if v not in idx: sc(v)
cyc = [s for s in sccs if len(s) > 1]
if '-v' in sys.argv:
    for m in sorted(edges): print(f"{m or '<lib>'} -> {', '.join(sorted(edges[m]))}")
print(f"{len(mods)} modules, {sum(len(e) for e in edges.values())} edges, {len(cyc)} cycles")
for s in cyc: print(f"  cycle of {len(s)}: {' '.join(sorted(s))}")
sys.exit(1 if cyc else 0)
