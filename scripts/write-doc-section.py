#!/usr/bin/env python3
"""Replaces the marked section of a Markdown doc with a freshly written one.

Usage: write-doc-section.py MARKER DOC SECTION_FILE [HEADING]

The section in DOC runs from `<!-- bench:MARKER:start` to
`<!-- bench:MARKER:end -->`; SECTION_FILE (`-` for stdin) holds the new one,
markers included. When DOC has no such section yet, the new one is appended,
after HEADING (a line such as `## Title`) when given. The bench scripts
(scripts/bench.sh, scripts/bench-read-side.sh, scripts/bench-cluster.sh) write
their numbers into docs/BENCHMARKS.md with it, each between its own markers.
"""
import re
import sys


def main(argv):
    if len(argv) not in (4, 5):
        sys.exit(__doc__.strip().splitlines()[2])
    marker, doc = argv[1], argv[2]
    source = sys.stdin if argv[3] == "-" else open(argv[3])
    section = source.read().rstrip("\n")
    heading = argv[4] if len(argv) == 5 else None
    text = open(doc).read()
    name = re.escape(marker)
    pattern = re.compile(rf"<!-- bench:{name}:start.*?<!-- bench:{name}:end -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n"
        if heading:
            text += heading + "\n\n"
        text += section + "\n"
    open(doc, "w").write(text)


if __name__ == "__main__":
    main(sys.argv)
