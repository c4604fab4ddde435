"""What the fusion kernels of a profile compute: each kernel name looked up in XLA's optimized HLO
dump (`XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text`), printed as its instruction (operand
and result shapes) and the ops of its fused computation.

    python benchmarks/hlo_fusions.py DIR [--module forward] [--contains 'bf16[2048,4096]'] NAME [NAME ...]

A profile names a fusion kernel after its HLO instruction with '.' written '_' (`fusion.12` ->
`fusion_12`); the same name occurs in every module, so --module (a substring of the dump's file
names) and --contains (a string the module's text holds, e.g. a shape of its batch) pick the
modules; the --files largest of those are described.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_INSTRUCTION = re.compile(r"^\s*(ROOT )?%?([\w.-]+) = (.*)$")


def computations(text: str) -> dict[str, list[str]]:
    """An HLO module's text -> its computations' instruction lines, by name."""
    out, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.-]+) [(]", line)
        if head and line.rstrip().endswith("{"):
            current = out.setdefault(head.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            current.append(line.strip())
    return out


def _op(line: str) -> str:
    """`%x = bf16[2048,4096]{1,0} multiply(%a, %b)` -> `multiply bf16[2048,4096]`."""
    m = _INSTRUCTION.match(line)
    if not m:
        return line[:80]
    rest = m.group(3)
    shape = re.match(r"^(\(?[\w\[\],{}: ]*?\)?)\s+([\w-]+)\(", rest)
    if not shape:
        return rest[:80]
    return f"{shape.group(2)} {re.sub(r'{[^}]*}', '', shape.group(1))}"


def describe(text: str, name: str) -> list[str]:
    """The instruction of fusion `name` (profile spelling) in one module's text, and a count of its
    fused computation's ops."""
    comps = computations(text)
    hlo_name = re.sub(r"_(\d+)$", r".\1", name)
    for lines in comps.values():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if m and m.group(2) in (hlo_name, name):
                called = re.search(r"calls=%?([\w.-]+)", line)
                out = [f"{name}: {re.sub(r'{[^}]*}', '', line)[:400]}"]
                if called and called.group(1) in comps:
                    ops = collections.Counter(_op(x) for x in comps[called.group(1)])
                    out += [f"    {n}x {op}" for op, n in ops.most_common(18)]
                return out
    return [f"{name}: not found"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump")
    parser.add_argument("names", nargs="+")
    parser.add_argument("--module", default="forward", help="a substring of the module files' names")
    parser.add_argument("--contains", action="append", default=[], help="a string the module's text holds (repeatable)")
    parser.add_argument("--files", type=int, default=2, help="how many of the matching modules (largest first)")
    args = parser.parse_args()
    files = [p for p in Path(args.dump).glob("*after_optimizations.txt") if args.module in p.name]
    texts = sorted(((p, p.read_text()) for p in files), key=lambda pt: -len(pt[1]))
    texts = [(p, t) for p, t in texts if all(c in t for c in args.contains)]
    if not texts:
        raise SystemExit(f"no *after_optimizations.txt with {args.module!r} in its name and {args.contains!r} "
                         f"in its text under {args.dump}")
    for path, text in texts[: args.files]:
        print(f"== {path.name}")
        for name in args.names:
            print("\n".join(describe(text, name)))


if __name__ == "__main__":
    main()
