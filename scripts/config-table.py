#!/usr/bin/env python3
"""Generates README.md's configuration table from the binaries' --help, so the
table cannot drift from the code. `--check` fails when README.md is stale.

Usage: scripts/config-table.py [--check] [BIN_DIR]   (default $CARGO_TARGET_DIR/debug, else target/debug)
"""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    ("seckill-worker", ["command"]),
    ("seckill-worker", ["query"]),
    ("seckill-worker", ["projector"]),
    ("seckill-operator", ["run"]),
    ("seckill", ["up"]),
    ("seckill", ["load"]),
    ("seckill", ["new", "promotion"]),
]
BEGIN, END = "<!-- config:begin -->", "<!-- config:end -->"


def options(binary, args):
    out = subprocess.run([binary, *args, "-h"], capture_output=True, text=True, check=True).stdout
    lines = out.split("Options:", 1)[1].splitlines()
    entries, current = [], None
    for line in lines:
        m = re.match(r"^\s+(?:-(\w), )?--([\w-]+)(?: <[^>]+>)?(?:\s{2,}(.*))?$", line)
        if m:
            current = {"flag": "--" + m.group(2), "short": m.group(1), "text": m.group(3) or ""}
            entries.append(current)
        elif current is not None and line.strip():
            current["text"] += " " + line.strip()
    rows = []
    for e in entries:
        if e["flag"] in ("--help", "--version"):
            continue
        text = e["text"]
        env = re.search(r"\[env: (\w+)=?[^\]]*\]", text)
        default = re.search(r"\[default: ([^\]]*)\]", text)
        choices = re.search(r"\[possible values: ([^\]]*)\]", text)
        desc = re.sub(r"\s*\[(env|default|possible values): [^\]]*\]", "", text).strip()
        if choices:
            desc = f"{desc} (values: {choices.group(1)})"
        rows.append((e["flag"], env.group(1) if env else "", default.group(1) if default else "", desc))
    return rows


def table(target):
    out = []
    for binary, args in COMMANDS:
        out.append(f"**`{binary} {' '.join(args)}`**\n")
        out.append("| flag | environment | default | meaning |")
        out.append("|---|---|---|---|")
        for flag, env, default, desc in options(str(target / binary), args):
            env = f"`{env}`" if env else ""
            default = f"`{default}`" if default not in ("", '""') else ""
            out.append(f"| `{flag}` | {env} | {default} | {desc.replace('|', '/')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def main():
    check = "--check" in sys.argv
    rest = [a for a in sys.argv[1:] if a != "--check"]
    default = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug"
    target = Path(rest[0]) if rest else default
    readme = (ROOT / "README.md").read_text()
    head, tail = readme.split(BEGIN, 1)
    _, tail = tail.split(END, 1)
    updated = f"{head}{BEGIN}\n{table(target)}{END}{tail}"
    if check:
        if updated != readme:
            print("README.md's configuration table is stale: run `make docs` and commit it", file=sys.stderr)
            sys.exit(1)
        print("README.md configuration table is up to date")
    else:
        (ROOT / "README.md").write_text(updated)


if __name__ == "__main__":
    main()
