#!/usr/bin/env python3
"""Reads `cargo test --no-run --message-format=json` on stdin and prints "name path" for
each test executable built (the lib's unit tests are named after the crate, memsnap)."""
import json
import sys

for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])
