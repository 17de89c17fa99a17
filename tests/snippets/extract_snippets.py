#!/usr/bin/env python3
"""Extracts the C++ and Python snippets of posenc's Markdown pages into programs the tests build
and run. The conventions are in tests/snippets/README.md. Python 3 standard library only.

  extract_snippets.py generate --root SRC --out DIR FILE.md...   writes DIR/<id>.cpp|.py and
                                                                 DIR/snippets.cmake (the list)
  extract_snippets.py check --root SRC FILE.md...                 lints only: exit 1 on a problem

FILE.md paths are relative to --root and appear so in test names and #line directives.
"""

import argparse
import os
import re
import sys

RUN_TAGS = {"cpp": "cpp", "python": "python"}
# Tags that would hide a C++ or Python snippet from the tests: use `cpp` or `python` instead.
ALIAS_TAGS = {"c++", "cxx", "cc", "hpp", "c", "py", "python3", "pycon", "ipython"}

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\s`]*)[^`]*$")
OPTION = re.compile(r"^(?P<key>skip|compile-only)\s*:\s*(?P<reason>\S.*)$|^mpi\s*=\s*(?P<np>[1-9][0-9]*)$")
MAIN = re.compile(r"^\s*int\s+main\s*\(", re.M)
INCLUDE = re.compile(r"^\s*#\s*include\b")
POSENC_INCLUDE = re.compile(r"^\s*#\s*include\s*[<\"](posenc/|Eigen/|eigen3/)")
# Lines that give away code in a block that is not tagged cpp or python.
CPP_HINT = re.compile(r"^\s*#\s*include\s*[<\"]|\bposenc::\w+.*;\s*(//.*)?$")
PY_HINT = re.compile(r"^\s*(import\s+\w+|from\s+\w+(\.\w+)*\s+import\s)|\bposenc\.\w+\(.*\)\s*(#.*)?$")


class Snippet:
    def __init__(self, path, index, lang, line, body):
        self.path = path          # Markdown file, relative to the root
        self.index = index        # 1-based among the file's cpp and python blocks
        self.lang = lang          # "cpp" or "python"
        self.line = line          # line of the opening fence
        self.body = body          # [(line number, text)]
        self.setup = []           # hidden code before the snippet
        self.check = []           # hidden code after it
        self.mode = "run"         # run, compile-only, skip
        self.reason = ""
        self.mpi = 0              # ranks when run under mpirun

    @property
    def name(self):
        return f"{self.path}:{self.index}"

    @property
    def ident(self):
        return re.sub(r"[^A-Za-z0-9]+", "_", f"{self.path}_{self.index}").strip("_")

    @property
    def where(self):
        return f"{self.path}:{self.line}"


class Comment:
    def __init__(self, first, last, kind, payload):
        self.first, self.last = first, last   # line numbers of `<!--` and `-->`
        self.kind = kind                      # "option", "setup", "check", or "bad"
        self.payload = payload                # option text, or [(line number, code)]


def parse_comment(lines, first, last):
    """A `<!-- snippet ... -->` comment spanning lines[first - 1 .. last - 1] (1-based)."""
    text = [lines[i - 1] for i in range(first, last + 1)]
    head = text[0].strip()[len("<!--"):].lstrip()
    m = re.match(r"snippet\s+(setup|check)\s*:(.*)$", head)
    if m:
        code = []
        rest = m.group(2)
        pieces = [(first, rest)] + [(first + i, t) for i, t in enumerate(text[1:], 1)]
        for n, t in pieces:
            if "-->" in t:
                t = t[: t.index("-->")]
            code.append((n, t.rstrip()))
        while code and not code[0][1].strip():
            code.pop(0)
        while code and not code[-1][1].strip():
            code.pop()
        return Comment(first, last, m.group(1), code)
    m = re.match(r"snippet\s*:\s*(.*?)\s*-->\s*$", head)
    if m and first == last:
        return Comment(first, last, "option", m.group(1))
    return Comment(first, last, "bad", head)


def scan(root, path):
    """Returns (snippets, problems) of one Markdown file."""
    with open(os.path.join(root, path), encoding="utf-8") as f:
        lines = f.read().split("\n")
    problems = []
    blocks = []      # (open line, close line, tag, [(line, text)])
    comments = []
    i = 0
    while i < len(lines):
        n = i + 1
        m = FENCE.match(lines[i])
        if m:
            fence, indent, tag = m.group("fence"), len(m.group("indent")), m.group("info").lower()
            body = []
            j = i + 1
            while j < len(lines):
                c = re.match(r"^\s*(`{3,}|~{3,})\s*$", lines[j])
                if c and c.group(1)[0] == fence[0] and len(c.group(1)) >= len(fence):
                    break
                t = lines[j]
                # Content of a fence indented in a list item loses that indentation.
                strip = min(indent, len(t) - len(t.lstrip(" ")))
                body.append((j + 1, t[strip:]))
                j += 1
            if j == len(lines):
                problems.append(f"{path}:{n}: code block is never closed")
                break
            blocks.append((n, j + 1, tag, body))
            i = j + 1
            continue
        stripped = lines[i].strip()
        if stripped.startswith("<!--") and re.match(r"<!--\s*snippet\b", stripped):
            j = i
            while "-->" not in lines[j]:
                j += 1
                if j == len(lines):
                    problems.append(f"{path}:{n}: snippet comment is never closed")
                    return [], problems
            c = parse_comment(lines, n, j + 1)
            if c.kind == "bad":
                problems.append(f"{path}:{n}: cannot read the snippet comment `{c.payload[:60]}`: expected "
                                "`<!-- snippet: OPTION -->`, `<!-- snippet setup: ... -->` or `<!-- snippet check: ... -->`")
            else:
                comments.append(c)
            i = j + 1
            continue
        i += 1

    by_last = {c.last: c for c in comments}
    by_first = {c.first: c for c in comments}
    used = set()
    snippets = []
    count = 0
    for open_line, close_line, tag, body in blocks:
        code = "\n".join(t for _, t in body)
        lang = RUN_TAGS.get(tag)
        # The comments stacked directly above the opening fence and directly below the closing one.
        before, after = [], []
        k = open_line - 1
        while k in by_last:
            before.insert(0, by_last[k])
            k = by_last[k].first - 1
        k = close_line + 1
        while k in by_first:
            after.append(by_first[k])
            k = by_first[k].last + 1
        used.update(id(c) for c in before + after)
        if lang is None:
            where = f"{path}:{open_line}"
            if tag in ALIAS_TAGS:
                problems.append(f"{where}: code block tagged `{tag}`: tag C++ `cpp` and Python `python` so that "
                                "the tests compile and run it")
            elif tag not in ("sh", "bash", "console", "cmake", "text", "json", "yaml", "toml", "ini", "diff", ""):
                problems.append(f"{where}: unknown code block tag `{tag}`: tests/snippets/README.md lists the tags")
            else:
                for n, t in body:
                    if CPP_HINT.search(t) or PY_HINT.search(t):
                        problems.append(f"{path}:{n}: looks like C++ or Python in a block tagged `{tag or '(none)'}`; "
                                        "tag it `cpp` or `python` (or `text` if it is neither)")
                        break
            if before or after:
                problems.append(f"{where}: snippet comments on a block tagged `{tag or '(none)'}`, which is not run")
            continue
        count += 1
        s = Snippet(path, count, lang, open_line, body)
        for c in before:
            if c.kind == "check":
                problems.append(f"{path}:{c.first}: `snippet check` goes below the block, after its closing fence")
            elif c.kind == "setup":
                s.setup += c.payload
            else:
                m = OPTION.match(c.payload)
                if not m:
                    problems.append(f"{path}:{c.first}: unknown snippet option `{c.payload}`: expected "
                                    "`skip: REASON`, `compile-only: REASON` or `mpi=N`")
                elif m.group("np"):
                    s.mpi = int(m.group("np"))
                else:
                    if s.mode != "run":
                        problems.append(f"{path}:{c.first}: a snippet is either skipped or compile-only")
                    s.mode, s.reason = m.group("key"), m.group("reason").strip()
        for c in after:
            if c.kind != "check":
                problems.append(f"{path}:{c.first}: only `snippet check` goes below a block; "
                                "options and setup go above it")
            else:
                s.check += c.payload
        if s.mpi and lang != "cpp":
            problems.append(f"{path}:{open_line}: `mpi=N` is for C++ snippets")
        if lang == "cpp":
            for n, t in s.setup + s.check:
                if POSENC_INCLUDE.match(t):
                    problems.append(f"{path}:{n}: hidden code must not include posenc or Eigen headers: the snippet "
                                    "shows every header it needs, and hidden code uses only what those give")
            if MAIN.search(code) and s.check:
                problems.append(f"{path}:{open_line}: a snippet that defines main cannot have a `snippet check`")
        if not code.strip():
            problems.append(f"{path}:{open_line}: empty code block")
        snippets.append(s)
    for c in comments:
        if id(c) not in used:
            problems.append(f"{path}:{c.first}: snippet comment not attached to a code block (options and setup go "
                            "on the lines directly above the opening fence, checks directly below the closing one)")
    return snippets, problems


class Writer:
    """Collects the lines of a generated C++ file, with #line directives that point compiler
    messages at the Markdown file for snippet and hidden code, and at the generated file otherwise."""

    def __init__(self, out_path):
        self.out_path = out_path.replace("\\", "/")
        self.lines = []
        self.mapped = False

    def generated(self, text):
        if self.mapped:
            self.lines.append(f'#line {len(self.lines) + 2} "{self.out_path}"')
            self.mapped = False
        self.lines.append(text)

    def source(self, path, numbered):
        last = None
        for n, t in numbered:
            if last is None or n != last + 1:
                self.lines.append(f'#line {n} "{path}"')
            self.lines.append(t)
            last = n
        self.mapped = True


def cpp_source(s, out_path):
    """The snippet's #include lines first, then snippet_support.hpp and the hidden code's standard
    headers; a fragment goes into main() between the hidden setup and check, a snippet that
    defines main follows the hidden setup (at namespace scope) as written."""
    w = Writer(out_path)
    w.generated(f"// Generated from {s.where} by tests/snippets/extract_snippets.py; edit the Markdown file.")
    split = lambda code, inc: [(n, t) for n, t in code if bool(INCLUDE.match(t)) == inc]
    w.source(s.path, split(s.body, True))
    w.generated('#include "snippet_support.hpp"')
    w.source(s.path, split(s.setup + s.check, True))
    if MAIN.search("\n".join(t for _, t in s.body)):
        w.source(s.path, split(s.setup, False))
        w.source(s.path, split(s.body, False))
    else:
        w.generated("int main([[maybe_unused]] int argc, [[maybe_unused]] char** argv) {")
        w.source(s.path, split(s.setup, False))
        w.source(s.path, split(s.body, False))
        w.source(s.path, split(s.check, False))
        w.generated(f'  std::printf("%s: ran\\n", "{s.where}");')
        w.generated("}")
    return "\n".join(w.lines) + "\n"


def python_source(s):
    out = [f"# Generated from {s.where} by tests/snippets/extract_snippets.py; edit the Markdown file."]
    for label, code in (("hidden setup", s.setup), ("snippet", s.body), ("hidden check", s.check)):
        if code:
            out.append(f"# --- {label}, from {s.path}:{code[0][0]}")
            out += [t for _, t in code]
    out.append(f'print("{s.where}: ran")')
    return "\n".join(out) + "\n"


def python_imports(s):
    mods = set()
    for _, t in s.setup + s.body + s.check:
        m = re.match(r"^\s*import\s+(.*)$", t)
        if m:
            mods.update(p.split()[0].split(".")[0] for p in m.group(1).split("#")[0].split(","))
        m = re.match(r"^\s*from\s+(\w+)", t)
        if m:
            mods.add(m.group(1))
    return sorted(mods - {"posenc"})


def write_if_changed(path, text):
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def cmake_quote(text):
    # A `;` would split the value into a CMake list: none of these texts needs one.
    text = text.replace(";", ",")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["generate", "check"])
    ap.add_argument("--root", required=True)
    ap.add_argument("--out")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()

    snippets, problems = [], []
    for path in a.files:
        s, p = scan(a.root, path)
        snippets += s
        problems += p
    if not snippets:
        problems.append("no `cpp` or `python` block found: is the extractor reading the right files?")
    for p in problems:
        print(f"snippet problem: {p}", file=sys.stderr)

    if a.command == "check":
        counts = {}
        for s in snippets:
            key = s.lang if s.mode == "run" else f"{s.lang} {s.mode}"
            counts[key] = counts.get(key, 0) + 1
        print(f"{len(a.files)} Markdown files, {len(snippets)} snippets ("
              + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f"), {len(problems)} problems")
        return 1 if problems else 0

    os.makedirs(a.out, exist_ok=True)
    listing = ["# Generated by tests/snippets/extract_snippets.py: one posenc_snippet() per snippet.",
               "# posenc_snippet(NAME IDENT LANG SOURCE MODE REASON MPI_RANKS IMPORTS WHERE)"]
    for s in snippets:
        if s.lang == "cpp":
            src = os.path.join(a.out, s.ident + ".cpp")
            write_if_changed(src, cpp_source(s, src))
            imports = []
        else:
            src = os.path.join(a.out, s.ident + ".py")
            write_if_changed(src, python_source(s))
            imports = python_imports(s)
        args = [s.name, s.ident, s.lang, src.replace("\\", "/"), s.mode, s.reason, str(s.mpi),
                ",".join(imports), s.where]
        listing.append("posenc_snippet(" + " ".join(cmake_quote(x) for x in args) + ")")
    write_if_changed(os.path.join(a.out, "snippets.cmake"), "\n".join(listing) + "\n")
    # Problems do not stop the configuration: the test snippet.lint reports them.
    return 0


if __name__ == "__main__":
    sys.exit(main())
