#!/usr/bin/env python3
"""Lists import circles between the files of each crate of the workspace.

A file depends on another when it names an item defined there: through `use crate::...`,
`use super::...`, `use self::...` or a path such as `crate::ops::conv::conv2d(...)` or
`cuda::forward(...)` (through a child module) in its code. Paths are resolved through the module tree (`mod x;` with `#[path]` and
`#[cfg_attr(..., path = "...")]`) and through `pub use` re-exports, to the file that defines
the item. A circle is a cycle of such dependencies between two or more files (a file naming
its own items does not count). Prints every circle found and exits 1 if there is one.

Usage: scripts/import-cycles.py [CRATE_DIR ...]   (default: every workspace member with src/)
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out = []
    for line in text.splitlines():
        # Drop `//` comments (doc comments included), keeping string literals intact enough.
        i = line.find("//")
        if i >= 0 and line[:i].count('"') % 2 == 0:
            line = line[:i]
        out.append(line)
    return "\n".join(out)


def strip_strings(text):
    return re.sub(r'"(\\.|[^"\\])*"', '""', text)


class Module:
    def __init__(self, path, file, parent):
        self.path = path  # tuple of names from the crate root
        self.file = file  # the file that holds this module's items
        self.parent = parent
        self.children = {}  # name -> Module
        self.reexports = {}  # item name -> absolute path tuple (through `pub use`)
        self.globs = []  # absolute module paths re-exported with `pub use x::*`
        self.items = set()  # names defined here (fn, struct, ...), best effort


def child_file(parent_file, is_dir_owner, name, path_attr):
    base = os.path.dirname(parent_file)
    if path_attr:
        return os.path.normpath(os.path.join(base, path_attr))
    if not is_dir_owner:
        base = os.path.join(base, os.path.splitext(os.path.basename(parent_file))[0])
    for cand in (os.path.join(base, name + ".rs"), os.path.join(base, name, "mod.rs")):
        if os.path.exists(cand):
            return cand
    return None


def owns_dir(file):
    return os.path.basename(file) in ("mod.rs", "lib.rs", "main.rs")


def use_trees(text):
    """Yields the use statements of `text` as (is_pub, path strings) with braces expanded."""
    for m in re.finditer(r"\b(pub(?:\([^)]*\))?\s+)?use\s+([^;]+);", text):
        is_pub = bool(m.group(1)) and "(" not in (m.group(1) or "")
        tree = re.sub(r"\s+as\s+", "@", m.group(2))
        for p in expand(re.sub(r"\s+", "", tree)):
            yield is_pub, p


def expand(tree):
    i = tree.find("{")
    if i < 0:
        return [tree]
    depth, j = 0, i
    while j < len(tree):
        if tree[j] == "{":
            depth += 1
        elif tree[j] == "}":
            depth -= 1
            if depth == 0:
                break
        j += 1
    prefix, inner, rest = tree[:i], tree[i + 1 : j], tree[j + 1 :]
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(inner):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:k])
            start = k + 1
    parts.append(inner[start:])
    out = []
    for p in parts:
        if p:
            for e in expand(prefix + p + rest):
                out.append(e)
    return out


def build(crate_dir):
    """The module tree of each target root (lib.rs, main.rs) of a crate: (roots, file -> Module).
    A module declared with `#[cfg_attr(not(feature = ...), path = "stand_in.rs")]` has two
    files, the real one and its stand-in; both are read."""
    src = os.path.join(crate_dir, "src")
    roots = [f for f in ("lib.rs", "main.rs") if os.path.exists(os.path.join(src, f))]
    modules = {}
    crates = []
    decl = re.compile(
        r"((?:#\[[^\]]*\]\s*)*)(?:pub(?:\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;"
    )
    for r in roots:
        root = Module((), os.path.join(src, r), None)
        crates.append(root)
        stack = [root]
        while stack:
            m = stack.pop()
            if m.file in modules:
                continue
            modules[m.file] = m
            raw = strip_comments(open(m.file, encoding="utf-8").read())
            for d in decl.finditer(raw):
                attrs, name = d.group(1), d.group(2)
                paths = re.findall(r'(cfg_attr\([^,]*,\s*)?path\s*=\s*"([^"]+)"', attrs)
                plain = [p for c, p in paths if not c]
                stand_ins = [p for c, p in paths if c]
                files = [child_file(m.file, owns_dir(m.file), name, plain[0] if plain else None)]
                files += [child_file(m.file, owns_dir(m.file), name, p) for p in stand_ins]
                for i, f in enumerate(files):
                    if f is None or not os.path.exists(f):
                        continue
                    c = Module(m.path + (name,), f, m)
                    if i == 0:
                        m.children[name] = c
                    stack.append(c)
    return crates, modules


def absolute(mod, segs):
    """The absolute path of `segs` (a use path split at ::) written inside `mod`."""
    if not segs:
        return None
    head = segs[0]
    if head == "crate":
        return list(segs[1:])
    if head == "self":
        return list(mod.path) + list(segs[1:])
    if head == "super":
        base = list(mod.path)
        i = 0
        while i < len(segs) and segs[i] == "super":
            if base:
                base.pop()
            i += 1
        return base + list(segs[i:])
    if head in mod.children:
        return list(mod.path) + list(segs)
    return None  # an external crate, or a local name


def resolve(root, path, depth=0):
    """The file defining the item at absolute `path` (list of names), following re-exports."""
    m = root
    i = 0
    while i < len(path) and path[i] in m.children:
        m = m.children[path[i]]
        i += 1
    if i < len(path) and depth < 20:
        name = path[i]
        if name in m.reexports:
            return resolve(root, m.reexports[name] + path[i + 1 :], depth + 1)
        if name not in m.items:
            for g in m.globs:
                f = resolve(root, g + [name] + path[i + 1 :], depth + 1)
                if f is not None:
                    return f
    return m.file


def main():
    dirs = sys.argv[1:]
    if not dirs:
        dirs = [
            os.path.join(ROOT, d)
            for d in sorted(os.listdir(ROOT))
            if os.path.isdir(os.path.join(ROOT, d, "src")) and d != "vendor"
        ]
    found = 0
    for crate_dir in dirs:
        crates, modules = build(crate_dir)
        for root in crates:
            mods = [m for m in modules.values() if m.file == root.file or is_under(m, root)]
            texts = {}
            for m in mods:
                text = strip_strings(strip_comments(open(m.file, encoding="utf-8").read()))
                texts[m.file] = text
                for kw in ("fn", "struct", "enum", "trait", "type", "const", "static", "macro_rules!"):
                    for d in re.finditer(r"\b" + re.escape(kw) + r"\s+(" + IDENT + ")", text):
                        m.items.add(d.group(1))
                for is_pub, p in use_trees(text):
                    if not is_pub:
                        continue
                    segs = p.split("::")
                    alias = None
                    if "@" in segs[-1]:  # `x as y`
                        segs[-1], alias = segs[-1].split("@", 1)
                    a = absolute(m, segs)
                    if a is None:
                        continue
                    if segs[-1] == "*":
                        m.globs.append(a[:-1])
                    elif segs[-1] == "self":
                        m.reexports[a[-2]] = a[:-1]
                    else:
                        m.reexports[alias or segs[-1]] = a
            edges = {}
            for m in mods:
                text = texts[m.file]
                outer = text
                for block in inline_modules(text):
                    outer = outer.replace(block, "")
                refs = []
                for _, p in use_trees(outer):
                    segs = p.split("::")
                    segs[-1] = segs[-1].split("@")[0]
                    refs.append(segs)
                for r in re.finditer(r"\b((?:crate|super|self)(?:::" + IDENT + r")+)", outer):
                    refs.append(r.group(1).split("::"))
                # Paths through a child module written in the code (`cuda::forward(..)`).
                for r in re.finditer(r"(?<![:\w])(" + IDENT + r"(?:::" + IDENT + r")+)", outer):
                    segs = r.group(1).split("::")
                    if segs[0] in m.children:
                        refs.append(segs)
                # Inside an inline `mod tests { ... }`, `super` is this file's module.
                for block in inline_modules(text):
                    for _, p in use_trees(block):
                        segs = p.split("::")
                        segs[-1] = segs[-1].split("@")[0]
                        if segs[0] == "super":
                            refs.append(["self"] + segs[1:])
                    for r in re.finditer(r"\b(super(?:::" + IDENT + r")+)", block):
                        refs.append(["self"] + r.group(1).split("::")[1:])
                for segs in refs:
                    if segs[-1] in ("*", "self"):
                        segs = segs[:-1]
                    a = absolute(m, segs)
                    if a is None:
                        continue
                    f = resolve(root, a)
                    if f and f != m.file:
                        edges.setdefault(m.file, set()).add(f)
            for cycle in cycles(edges):
                found += 1
                rel = [os.path.relpath(f, ROOT) for f in cycle]
                print("circle: " + " -> ".join(rel + [rel[0]]))
            for a in sorted(edges):
                for b in sorted(edges[a]):
                    if a < b and a in edges.get(b, ()):
                        print(f"  mutual: {os.path.relpath(a, ROOT)} <-> {os.path.relpath(b, ROOT)}")
    if found:
        print(f"{found} import circle(s)")
        return 1
    print("no import circles")
    return 0


def inline_modules(text):
    """The bodies of the inline `mod name { ... }` blocks of a file (outermost only)."""
    out = []
    for m in re.finditer(r"\bmod\s+" + IDENT + r"\s*\{", text):
        if any(m.start() < e and m.start() > b for b, e, _ in out):
            continue
        depth, j = 0, m.end() - 1
        while j < len(text):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        out.append((m.end(), j, text[m.end() : j]))
    return [b for _, _, b in out]


def is_under(m, root):
    p = m.parent
    while p is not None:
        if p is root:
            return True
        p = p.parent
    return False


def cycles(edges):
    """One representative cycle per strongly connected component of two or more files."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(shortest_cycle(edges, sorted(comp)))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def shortest_cycle(edges, comp):
    comp_set = set(comp)
    start = comp[0]
    prev = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges.get(v, ())):
            if w not in comp_set:
                continue
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return list(reversed(path))
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


if __name__ == "__main__":
    sys.exit(main())
