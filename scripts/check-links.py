#!/usr/bin/env python3
"""Checks every relative link in the project's Markdown: the file must exist and, for
`file.md#anchor` or `#anchor`, a heading of that file must have that anchor (GitHub's rules:
lowercase, punctuation but `-` and `_` dropped, spaces to `-`, `-1`, `-2` for repeats).
Links to http(s) and mailto are not fetched. Exits 1 listing every broken link.

Usage: scripts/check-links.py [FILE.md ...]   (default: README.md, SECURITY.md, docs/*.md,
every README.md under deploy/, bpf/README.md)
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text):
    """Lines outside fenced code blocks, with inline code removed."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def slug(heading):
    s = heading.strip().lower()
    s = re.sub(r"<[^>]+>", "", s)
    s = s.replace("`", "")
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s)
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(path):
    seen = {}
    out = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def main(argv):
    files = [pathlib.Path(a).resolve() for a in argv] or [
        ROOT / "README.md",
        ROOT / "SECURITY.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "deploy").rglob("README.md")),
        ROOT / "bpf" / "README.md",
    ]
    broken = []
    checked = 0
    cache = {}
    for f in files:
        for lineno, line in enumerate(prose_lines(f.read_text(encoding="utf-8")), 1):
            line = re.sub(r"`[^`]*`", "", line)
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue  # http:, https:, mailto:
                checked += 1
                path_part, _, anchor = target.partition("#")
                dest = (f.parent / path_part).resolve() if path_part else f
                where = f"{f.relative_to(ROOT)}: ({target})"
                if not dest.exists():
                    broken.append(f"{where}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
                    continue
                if anchor:
                    if dest.suffix != ".md":
                        broken.append(f"{where}: anchor into a non-Markdown file")
                        continue
                    if dest not in cache:
                        cache[dest] = anchors(dest)
                    if anchor not in cache[dest]:
                        broken.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    for b in broken:
        print(b)
    print(f"{checked} relative links checked in {len(files)} files, {len(broken)} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
