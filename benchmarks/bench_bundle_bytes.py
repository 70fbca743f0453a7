"""Where the bytes of a bundled ``train_gpt.py`` are: each module's and each large definition's
share of the compressed file.

    python benchmarks/bench_bundle_bytes.py FILE [--top 40] [--min-chars 300]

FILE is a file written by ``pgolf bundle`` (``pgolf bundle --preset pr1855 --out FILE``, or with
``--no-fold`` to see the unfolded code). A share is what the brotli-11 stream of all embedded
sources (the bundle's own compressor and settings) loses when that module, or that top-level
function, class or method, is left out: the bytes it adds to the file, about. The shares of
overlapping or similar code are not additive (what one copy costs, the other saves).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compressed(modules: dict[str, str]) -> int:
    from pgolf.train.codesize import codec_functions

    return len(codec_functions("brotli")[0]("\0".join(f"{k}\0{v}" for k, v in sorted(modules.items())).encode()))


def definitions(src: str, min_chars: int):
    """(qualified name, source text) of top-level functions and classes and of class methods."""
    for st in ast.parse(src).body:
        items = [(st.name, st)] if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else []
        if isinstance(st, ast.ClassDef):
            items += [(f"{st.name}.{m.name}", m) for m in st.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for name, node in items:
            text = ast.get_source_segment(src, node)
            if text and len(text) >= min_chars:
                yield name, text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="a train_gpt.py written by pgolf bundle")
    ap.add_argument("--top", type=int, default=40, help="definitions to list (default 40)")
    ap.add_argument("--min-chars", type=int, default=300, help="skip definitions shorter than this (minified characters)")
    args = ap.parse_args(argv)
    from pgolf.submit.bundle import read_bundle

    _, modules = read_bundle(args.file)
    total = compressed(modules)
    code = {k: v for k, v in modules.items() if "/" not in k}
    print(f"{args.file}: {Path(args.file).stat().st_size:,} bytes; embedded sources {sum(map(len, code.values())):,} "
          f"characters in {len(code)} modules, {total:,} bytes compressed")
    rows = sorted(((total - compressed({k: v for k, v in modules.items() if k != m}), len(src), m) for m, src in code.items()),
                  reverse=True)
    print(f"\n{'share':>7} {'chars':>8}  module")
    for share, chars, m in rows:
        print(f"{share:>7,} {chars:>8,}  {m}")
    defs = []
    for m, src in code.items():
        for name, text in definitions(src, args.min_chars):
            defs.append((total - compressed({**modules, m: src.replace(text, "", 1)}), len(text), f"{m}:{name}"))
    print(f"\n{'share':>7} {'chars':>8}  definition (the {args.top} largest shares)")
    for share, chars, name in sorted(defs, reverse=True)[: args.top]:
        print(f"{share:>7,} {chars:>8,}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
