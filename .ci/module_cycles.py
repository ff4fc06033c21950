#!/usr/bin/env python3
"""Fails when the source files of a crate import each other in a circle.

For every crate (a folder with Cargo.toml and src/) under the given root, each crate root
(src/lib.rs, src/main.rs, src/bin/*.rs) is walked through its `mod` declarations to map module
paths to files. Every reference to another module of the same crate is then an edge between two
files: `use` trees and paths in code that start with `crate::`, `super::`, `self::`, with the name
of a child module, or with a name a `use` bound to a module (binding the module's name alone is
no edge; the paths written through it are). Comments, strings and character
literals are skipped, and inline modules (`mod tests { ... }`) count as part of their file, so
`use super::*` in a test module is no edge. `mod` declarations are structure, not imports, and
are no edges. Nor are references from a module's own file (lib.rs, main.rs, mod.rs, or foo.rs
beside a foo/ folder) down into its own submodules: a module is composed of its submodules and
re-exports them, so `use super::Error` in a child of a module that re-exports the child is no
circle. `--strict` counts those edges too.

A cycle is a strongly connected component of more than one file; each one is printed with one
circle through it and the references that make its edges.

Usage: module_cycles.py [--strict] [ROOT]   (ROOT: the workspace; default: the current folder)
       module_cycles.py --self-test
Python 3 standard library only.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def strip_code(text: str) -> str:
    """`text` with comments, string and char literals replaced by spaces (newlines kept), so that
    offsets and braces in what is left are the code's own."""
    out = []
    i, n = 0, len(text)

    def blank(chunk: str) -> str:
        return "".join("\n" if c == "\n" else " " for c in chunk)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(text[i:j]))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(text[i:j]))
            i = j
        elif c in "rb" and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            # Raw strings r"..", r#".."#, br"..", and byte strings b"..", b'..'.
            m = re.match(r'(b?r)(#*)"', text[i:])
            if m:
                end = text.find('"' + m.group(2), i + m.end())
                end = n if end < 0 else end + 1 + len(m.group(2))
                out.append(blank(text[i:end]))
                i = end
            elif text.startswith('b"', i) or text.startswith("b'", i):
                out.append(" ")
                i += 1  # the literal itself is handled by the next iteration
            else:
                out.append(c)
                i += 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(blank(text[i : j + 1]))
            i = j + 1
        elif c == "'":
            # A char literal ('a', '\n', '{') or a lifetime / label ('a, 'static).
            if i + 1 < n and text[i + 1] == "\\":
                j = i + 2
                while j < n and text[j] != "'":
                    j += 1
                out.append(blank(text[i : j + 1]))
                i = j + 1
            elif i + 2 < n and text[i + 2] == "'":
                out.append("   ")
                i += 3
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching_brace(code: str, open_at: int) -> int:
    depth = 0
    for j in range(open_at, len(code)):
        if code[j] == "{":
            depth += 1
        elif code[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return len(code)


MOD_DECL = re.compile(r"\bmod\s+(" + IDENT + r")\s*;")
MOD_INLINE = re.compile(r"\bmod\s+(" + IDENT + r")\s*\{")
USE_STMT = re.compile(r"\buse\s+([^;]*);")


@dataclass
class SourceFile:
    path: Path
    module: tuple[str, ...]  # the file's module path inside its crate root
    code: str = ""
    # (start, end, name) of inline modules, outermost first
    inline: list[tuple[int, int, str]] = field(default_factory=list)


def child_file(parent: Path, is_dir_owner: bool, name: str) -> Path | None:
    """The file of `mod name;` declared in `parent` (mod.rs/lib.rs/main.rs own their folder;
    other files own a folder named after their stem)."""
    base = parent.parent if is_dir_owner else parent.parent / parent.stem
    for candidate in (base / f"{name}.rs", base / name / "mod.rs"):
        if candidate.is_file():
            return candidate
    return None


def load_crate_root(root_file: Path) -> dict[tuple[str, ...], SourceFile]:
    """Module path -> file, for every module reachable from one crate root; inline modules map
    to the file they are written in."""
    modules: dict[tuple[str, ...], SourceFile] = {}
    pending = [(root_file, ())]
    while pending:
        path, module = pending.pop()
        src = SourceFile(path, module, strip_code(path.read_text(encoding="utf-8")))
        for m in MOD_INLINE.finditer(src.code):
            open_at = m.end() - 1
            src.inline.append((m.start(), matching_brace(src.code, open_at), m.group(1)))
        modules[module] = src
        for start, end, _ in src.inline:
            modules.setdefault(module + inline_path(src, start + 1), src)
        is_dir_owner = path.name in ("mod.rs", "lib.rs", "main.rs") or module == ()
        for m in MOD_DECL.finditer(src.code):
            child = child_file(path, is_dir_owner, m.group(1))
            if child is not None:
                pending.append((child, module + inline_path(src, m.start()) + (m.group(1),)))
    return modules


def inline_path(src: SourceFile, offset: int) -> tuple[str, ...]:
    return tuple(name for start, end, name in src.inline if start < offset < end)


def expand_use_tree(tree: str) -> list[list[str]]:
    """`a::{b, c::{d as e, *}}` -> [[a, b], [a, c, d as e], [a, c, *]]."""
    tree = re.sub(r"\s*([{},]|::)\s*", r"\1", " ".join(tree.split()))

    def parse(s: str, prefix: list[str]) -> list[list[str]]:
        if "{" not in s:
            segments = [seg for seg in s.split("::") if seg]
            return [prefix + segments]
        head, _, rest = s.partition("{")
        inner = rest[: rest.rfind("}")]
        base = prefix + [seg for seg in head.split("::") if seg]
        parts, depth, current = [], 0, ""
        for ch in inner:
            if ch == "," and depth == 0:
                parts.append(current)
                current = ""
                continue
            depth += ch == "{"
            depth -= ch == "}"
            current += ch
        parts.append(current)
        paths = []
        for part in parts:
            if part:
                paths += parse(part, base)
        return paths

    return parse(tree, [])


def split_alias(segment: str) -> tuple[str, str | None]:
    m = re.fullmatch(r"(" + IDENT + r") as (" + IDENT + r")", segment)
    return (m.group(1), m.group(2)) if m else (segment, None)


class CrateGraph:
    def __init__(self, modules: dict[tuple[str, ...], SourceFile], strict: bool):
        self.modules = modules
        self.strict = strict
        self.edges: dict[Path, dict[Path, str]] = {}

    def children(self, module: tuple[str, ...]) -> set[str]:
        return {p[-1] for p in self.modules if len(p) == len(module) + 1 and p[:-1] == module}

    def absolute(self, scope, segments, aliases):
        """The absolute module path that `segments` (a path written in `scope`) starts from."""
        first, rest = segments[0], segments[1:]
        if first == "crate" or first == "$crate":
            return list(rest)
        if first == "self":
            return list(scope) + rest
        if first == "super":
            base = list(scope)
            while segments and segments[0] == "super":
                base = base[:-1]
                segments = segments[1:]
            if segments and segments[0] == "self":
                segments = segments[1:]
            return base + list(segments)
        if first in self.children(scope):
            return list(scope) + list(segments)
        if first in aliases:
            return list(aliases[first]) + rest
        return None  # another crate, std, a type or a local item

    def target(self, path):
        """The file of the longest module prefix of `path`."""
        for k in range(len(path), -1, -1):
            src = self.modules.get(tuple(path[:k]))
            if src is not None:
                return src, tuple(path[:k])
        return None, None

    def add_edge(self, src: SourceFile, dst: SourceFile, what: str):
        if dst.path == src.path:
            return
        if not self.strict and dst.module[: len(src.module)] == src.module:
            return  # a module's own file using or re-exporting its submodules: composition
        self.edges.setdefault(src.path, {}).setdefault(dst.path, what)

    def scan(self):
        seen = set()
        for module, src in self.modules.items():
            if src.path in seen:
                continue
            seen.add(src.path)
            code = src.code
            aliases: dict[str, tuple[str, ...]] = {}
            spans = []
            for m in USE_STMT.finditer(code):
                spans.append((m.start(), m.end()))
                scope = src.module + inline_path(src, m.start())
                for segments in expand_use_tree(m.group(1)):
                    last, alias = split_alias(segments[-1])
                    segments = segments[:-1] + [last]
                    if segments[0] == "":
                        continue
                    absolute = self.absolute(scope, segments, aliases)
                    if absolute is None:
                        continue
                    if absolute and absolute[-1] == "self":
                        absolute = absolute[:-1]
                        last = absolute[-1] if absolute else last
                    dst, found = self.target([s for s in absolute if s != "*"])
                    if dst is None:
                        continue
                    if absolute and tuple(absolute) == found:
                        # A module brought into scope is a name, not a dependency yet: the
                        # paths written through it are.
                        aliases[alias or last] = found
                        continue
                    self.add_edge(src, dst, "use " + " ".join(m.group(1).split()))
            masked = list(code)
            for start, end in spans:
                masked[start:end] = " " * (end - start)
            masked = "".join(masked)
            for m in re.finditer(r"(?<![\w:$.])(\$?" + IDENT + r")((?:\s*::\s*" + IDENT + r")+)", masked):
                segments = [m.group(1)] + [s.strip() for s in m.group(2).split("::")[1:]]
                scope = src.module + inline_path(src, m.start())
                absolute = self.absolute(scope, segments, aliases)
                if absolute is None:
                    continue
                dst, _ = self.target(absolute)
                if dst is not None:
                    self.add_edge(src, dst, re.sub(r"\s+", "", m.group(0)))


def strongly_connected(nodes, edges):
    """Tarjan's algorithm, iterative."""
    index, low, on_stack, stack, result = {}, {}, set(), [], []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges.get(nxt, {})))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    result.append(sorted(component))
    return result


def circle_through(component, edges):
    """One closed walk through the component, from its first file back to it (BFS)."""
    members = set(component)
    start = component[0]
    previous = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(edges.get(node, {})):
            if nxt == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if nxt in members and nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return component


def crate_roots(root: Path):
    for manifest in sorted(root.glob("*/Cargo.toml")) + ([root / "Cargo.toml"] if (root / "src").is_dir() else []):
        src = manifest.parent / "src"
        if not src.is_dir():
            continue
        for candidate in [src / "lib.rs", src / "main.rs", *sorted((src / "bin").glob("*.rs"))]:
            if candidate.is_file():
                yield candidate


def find_cycles(root: Path, strict: bool = False):
    """[(crate root, [component files], circle, edges)] for every cycle under `root`."""
    found = []
    for crate_root in crate_roots(root):
        graph = CrateGraph(load_crate_root(crate_root), strict)
        graph.scan()
        files = sorted({src.path for src in graph.modules.values()})
        for component in strongly_connected(files, graph.edges):
            found.append((crate_root, component, circle_through(component, graph.edges), graph.edges))
    return found


def report(root: Path, strict: bool) -> int:
    cycles = find_cycles(root, strict)
    rel = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    if not cycles:
        print(f"module-cycle check: no import cycles between files under {root}")
        return 0
    print(f"module-cycle check: {len(cycles)} import cycle(s)")
    for crate_root, component, circle, edges in cycles:
        print(f"\n{rel(crate_root)}: {len(component)} files in a cycle: " + ", ".join(rel(p) for p in component))
        print("  " + " -> ".join(rel(p) for p in circle))
        for a, b in zip(circle, circle[1:]):
            print(f"    {rel(a)} -> {rel(b)}: {edges[a][b]}")
    return 1


def self_test() -> int:
    import tempfile

    scratch = tempfile.TemporaryDirectory(prefix="module-cycles-")

    def tree(files: dict[str, str]) -> Path:
        root = Path(tempfile.mkdtemp(dir=scratch.name))
        for name, body in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(body)
        return root

    manifest = '[package]\nname = "t"\n'
    cases = {
        "acyclic": ({
            "a/Cargo.toml": manifest,
            "a/src/lib.rs": "pub mod x;\npub mod y;\nmod z { pub fn f() {} }\n",
            "a/src/x.rs": "use crate::y::Y;\n// use crate::z; crate::y in a comment\n"
                          "pub fn f() -> Y { let _ = \"crate::lib::x {\"; let _c = '{'; Y }\n"
                          "#[cfg(test)]\nmod tests {\n    use super::*;\n    fn g<'a>(s: &'a str) {}\n}\n",
            "a/src/y.rs": "pub struct Y;\nimpl Y { fn n() -> std::fmt::Result { Ok(()) } }\n",
        }, []),
        "use cycle": ({
            "a/Cargo.toml": manifest,
            "a/src/lib.rs": "pub mod x;\npub mod y;\n",
            "a/src/x.rs": "use crate::y::Y;\npub struct X;\n",
            "a/src/y.rs": "use crate::{x::X as Ex};\npub struct Y;\n",
        }, [["a/src/x.rs", "a/src/y.rs"]]),
        "super and nested folders": ({
            "a/Cargo.toml": manifest,
            "a/src/main.rs": "mod http;\nmod jobs;\n",
            "a/src/http/mod.rs": "pub mod edit;\npub fn route() { edit::handler(); }\n",
            "a/src/http/edit.rs": "pub fn handler() { crate::jobs::run(); }\npub struct R;\n",
            "a/src/jobs.rs": "use crate::http;\npub fn run() {}\nfn r() -> http::edit::R { todo!() }\n",
        }, [["a/src/http/edit.rs", "a/src/jobs.rs"]]),
        "three-file cycle through super": ({
            "a/Cargo.toml": manifest,
            "a/src/lib.rs": "pub mod ops;\npub mod attention;\n",
            "a/src/ops/mod.rs": "pub mod modules;\npub mod kernel;\n",
            "a/src/ops/modules.rs": "use super::kernel::k;\n",
            "a/src/ops/kernel.rs": "pub fn k() { let _ = crate::attention::A; }\n",
            "a/src/attention.rs": "pub struct A;\nuse crate::ops::modules as m;\nfn f() { m::g(); }\n",
        }, [["a/src/attention.rs", "a/src/ops/kernel.rs", "a/src/ops/modules.rs"]]),
        "strings, comments and lifetimes are no references": ({
            "a/Cargo.toml": manifest,
            "a/src/lib.rs": "pub mod x;\npub mod y;\n",
            "a/src/x.rs": "const S: &str = r#\"{ \"crate::y::h\" }\"#;\nconst B: &[u8] = b\"crate::y::h\";\n"
                          "/* crate::y::h /* nested */ crate::y::h */\nfn f<'a>(s: &'a u8) -> &'a u8 { s }\n"
                          "pub fn g() { let _ = ('\\'', '\"'); let _ = \"crate::y::h \\\" crate::y::h\"; }\n",
            "a/src/y.rs": "pub fn h() {}\nfn k() { super::x::g(); }\n",
        }, []),
        "a reference after a lifetime and a char literal still counts": ({
            "a/Cargo.toml": manifest,
            "a/src/lib.rs": "pub mod x;\npub mod y;\n",
            "a/src/x.rs": "fn f<'a>(s: &'a u8) -> char { '{' }\npub fn g() { crate::y::h(); }\n",
            "a/src/y.rs": "pub fn h() {}\nfn k() { super::x::g(); }\n",
        }, [["a/src/x.rs", "a/src/y.rs"]]),
    }
    facade = {
        "a/Cargo.toml": manifest,
        "a/src/lib.rs": "pub mod data;\n",
        "a/src/data/mod.rs": "mod folder;\npub use folder::Folder;\npub type Result = ();\n",
        "a/src/data/folder.rs": "use super::Result;\npub struct Folder;\n",
    }
    cases["a module re-exporting its child (default)"] = (facade, [])
    cases["a module re-exporting its child (--strict)"] = (facade, [["a/src/data/folder.rs", "a/src/data/mod.rs"]])
    failures = 0
    for name, (files, expected) in cases.items():
        root = tree(files)
        cycles = find_cycles(root, strict=name.endswith("(--strict)"))
        got = [[p.relative_to(root).as_posix() for p in component] for _, component, _, _ in cycles]
        ok = sorted(got) == sorted(expected)
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}: expected {expected}, found {got}")
    scratch.cleanup()
    return 1 if failures else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["--self-test"]:
        sys.exit(self_test())
    strict = "--strict" in args
    args = [a for a in args if a != "--strict"]
    if len(args) > 1 or any(a.startswith("-") for a in args):
        sys.exit(__doc__)
    sys.exit(report(Path(args[0] if args else ".").resolve(), strict))
