"""The code bytes of a submission, computed where the training loop can use them: the pgolf
modules a run loads, shaken (unreachable top-level definitions dropped), minified and packed into
the single-file ``train_gpt.py`` form that ``pgolf bundle`` (``pgolf.submit.bundle``) writes and
verifies. A run that is not a bundled script counts :func:`package_code_bytes`, an upper bound of
that file's size; a bundled script counts its own exact size.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import lzma
import os
import re
from pathlib import Path
from typing import Any

from pgolf.config import RunConfig, diff_from_defaults, to_dict
from pgolf.errors import UserError


class CodePackError(UserError):
    """The package's sources could not be packed (a module that cannot be read or minified)."""

#: pgolf modules that never go into a bundle (command line and submission tooling; the optional
#: experiment trackers, which a bundled script never attaches).
TOOLING = ("pgolf.cli", "pgolf.submit.bundle", "pgolf.submit.record", "pgolf.submit.audit", "pgolf.submit.stats", "pgolf.submit.seeds",
           "pgolf.train.tracker")
#: Modules every bundle carries, whatever the probe saw (the launcher's entry point).
ALWAYS = ("pgolf", "pgolf.submit", "pgolf.submit.entry", "pgolf.config", "pgolf.config.envvars")
WRAPPERS = ("plain", "lzma", "brotli", "zstd", "lzma-latin1", "brotli-latin1", "zstd-latin1")
CODEC_MODULE = {"lzma": "lzma", "brotli": "brotli", "zstd": "zstandard"}
LATIN1_COOKIE = "coding: latin-1"  # PEP 263: a comment on line 1 naming the file's encoding
# bytes a single-quoted latin-1 literal cannot hold as themselves (NUL is refused in source,
# CR/LF end the line, quote and backslash end or escape); every other byte is one character
_LATIN1_ESCAPES = {0: "\\x00", 10: "\\n", 13: "\\r", 39: "\\'", 92: "\\\\"}
_LATIN1_TABLE = [_LATIN1_ESCAPES.get(b, chr(b)) for b in range(256)]

# The launcher, run with exec() in the bundled file's globals, where S = [launcher, config JSON,
# name, text, name, text, ...]: a dotted name is a module's source, a name with "/" a package data
# file (served to importlib.resources from an in-memory zip). Tracebacks show the embedded lines.
LAUNCHER = """import sys,io,json,zipfile,linecache,importlib.util as U
M=dict(zip(S[2::2],S[3::2]))
Z=zipfile.ZipFile(io.BytesIO(),'a')
for k in M:'/'in k and Z.writestr(k,M[k])
class L:
 def find_spec(s,n,p=None,t=None):
  if n.split('.')[0]=='pgolf':
   if n not in M:raise ImportError(n+' is not in this bundle: the configuration needs code its preset did not use; re-run pgolf bundle with it',name=n)
   return U.spec_from_loader(n,s,origin='bundle:'+n,is_package=any(k.startswith(n+'.')for k in M))
 def create_module(s,p):0
 def exec_module(s,m):o=m.__spec__.origin;c=M[m.__name__];linecache.cache[o]=len(c),None,c.splitlines(1),o;exec(compile(c,o,'exec'),m.__dict__)
 def get_resource_reader(s,n):return type('R',(),{'files':lambda r:zipfile.Path(Z,n.replace('.','/')+'/')})()
sys.meta_path.insert(0,L())
if __name__=='__main__':from pgolf.submit.entry import main;main(json.loads(S[1]),__file__)"""





def bundle_config(cfg: RunConfig, *, keep_data_paths: bool = False) -> dict[str, Any]:
    """The config a bundle embeds: the settings that differ from the dataclass defaults (the
    bundle carries those defaults in its own sources), with the data paths replaced by the
    challenge's defaults for the vocabulary, relative to the directory the script runs in, unless
    ``keep_data_paths`` (machine paths are not part of a recipe)."""
    out: dict[str, Any] = {"preset": cfg.preset, "profile": cfg.profile, **diff_from_defaults(cfg)}
    if not keep_data_paths:
        v = cfg.model.vocab_size
        out["data"] = {**out.get("data", {}), "path": f"./data/datasets/fineweb10B_sp{v}",
                       "tokenizer": f"./data/tokenizers/fineweb_{v}_bpe.model"}
    return out


# ------------------------------------------------------------------------------------------------
# sources: shake, minify


def module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin and spec.origin.endswith(".py"), f"{name} has no Python source"
    return Path(spec.origin).read_text(encoding="utf-8")


_IDENT = re.compile(r"[A-Za-z_]\w*\Z")
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _module_aliases(tree: ast.AST, modules: set[str]) -> dict[str, str]:
    """Names that a module binds (at any level) to a bundled pgolf module: ``import pgolf.a.b as x``
    and ``from pgolf.a import b [as x]`` when ``pgolf.a.b`` is a module."""
    out: dict[str, str] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                if a.asname and a.name in modules:
                    out[a.asname] = a.name
        elif _pgolf_from_import(n):
            for a in n.names:
                if f"{n.module}.{a.name}" in modules:
                    out[a.asname or a.name] = f"{n.module}.{a.name}"
    return out


def _module_of(node: ast.AST, aliases: dict[str, str], modules: set[str]) -> str | None:
    """The bundled module an expression names (an alias, or a dotted ``pgolf.a.b``), else None."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id) or (node.id if node.id in modules else None)
    if isinstance(node, ast.Attribute):
        base = _module_of(node.value, aliases, modules)
        return f"{base}.{node.attr}" if base and f"{base}.{node.attr}" in modules else None
    return None


def _mentions(node: ast.AST, aliases: dict[str, str] | None = None, modules: set[str] = frozenset()) -> set[str]:
    """Names a node can reach a top-level definition by: names, identifier-like string constants
    (``getattr(obj, "name")``) and attributes of a bundled module (``cops.encode``,
    ``pgolf.quant.ctxcoder.decode_ctx``: ``"module:attr"``, which keeps that module's definition
    only). Any other attribute (``text.decode()``, ``self.run``) cannot name a top-level
    definition and is recorded as ``".attr"`` (``aliases=None``: every attribute by its bare name,
    the old, looser rule)."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            if aliases is None:
                out.add(n.attr)
            else:
                mod = _module_of(n.value, aliases, modules)
                out.add(f"{mod}:{n.attr}" if mod else f".{n.attr}")
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and _IDENT.match(n.value):
            out.add(n.value)  # getattr(obj, "name") and the like
    return out


def _pgolf_from_import(st: ast.stmt) -> bool:
    return isinstance(st, ast.ImportFrom) and st.level == 0 and bool(st.module) and st.module.split(".")[0] == "pgolf"


def shake(sources: dict[str, str], roots: set[str]) -> dict[str, str]:
    """Remove top-level defs/classes that nothing kept mentions; returns the new sources.

    Conservative and name-based: every non-definition top-level statement is kept and its names
    are roots; a definition is kept if its name is mentioned by kept code anywhere (any module),
    so name collisions only ever keep more, except that an attribute of a bundled module
    (``alias.name``) keeps only that module's ``name`` (see ``_mentions``). Top-level
    ``from pgolf... import`` statements lose the names nothing mentions, so no import asks for a
    removed definition."""
    trees = {m: ast.parse(s) for m, s in sources.items()}
    modules = set(sources)
    aliases = {m: _module_aliases(tree, modules) for m, tree in trees.items()}
    seen = set(roots)
    for m, tree in trees.items():
        for st in tree.body:
            if not isinstance(st, _DEFS) and not _pgolf_from_import(st):
                seen |= _mentions(st, aliases[m], modules)
    kept: set[tuple[str, str]] = set()
    changed = True
    while changed:
        changed = False
        for m, tree in trees.items():
            for st in tree.body:
                if isinstance(st, _DEFS) and (m, st.name) not in kept and (st.name in seen or f"{m}:{st.name}" in seen):
                    kept.add((m, st.name))
                    seen |= _mentions(st, aliases[m], modules)
                    changed = True
    out = {}
    for m, tree in trees.items():
        body = []
        for st in tree.body:
            if isinstance(st, _DEFS) and (m, st.name) not in kept:
                continue
            if _pgolf_from_import(st):
                st.names = [a for a in st.names if (a.asname or a.name) in seen or f"{st.module}.{a.name}" in modules]
                if not st.names:
                    continue
            body.append(st)
        tree.body = body
        out[m] = ast.unparse(tree)
    return out


_MINIFIED: dict[str, str] = {}  # sha256 of a shaken source -> minified text (per process)


def minify(source: str, name: str) -> str:
    """python-minifier with the globals kept (other modules import them by name). Results are
    cached by content hash in memory and in ``$PGOLF_CACHE/minify`` (default ~/.cache/pgolf),
    since every training run estimates its bundle."""
    import python_minifier

    version = importlib.metadata.version("python-minifier")  # the output depends on it
    key = hashlib.sha256(f"{version}\0{source}".encode()).hexdigest()
    if key in _MINIFIED:
        return _MINIFIED[key]
    cached = Path(os.environ.get("PGOLF_CACHE") or "~/.cache/pgolf").expanduser() / "minify" / f"{key}.py"
    try:
        text = cached.read_text(encoding="utf-8")
    except OSError:
        text = python_minifier.minify(
            source, filename=name, rename_globals=False, remove_literal_statements=True,
            hoist_literals=False,  # hoisting literals into names compresses worse
            preserve_shebang=False,
        )
        try:  # a cache: a read-only or full disk only costs time
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, cached)
        except OSError:
            pass
    _MINIFIED[key] = text
    return text


def prepare_sources(modules: list[str], check: bool = True, fold: RunConfig | None = None,
                    live: set[str] | None = None) -> tuple[dict[str, str], int]:
    """Shaken + minified sources of ``modules`` (with their parent packages) and data files, and
    the raw size. ``check``: every module-level pgolf import must be among them. ``fold``: the
    one configuration the sources will run, folded into them (:mod:`pgolf.train.fold`) with
    ``live`` the settings that stay read from the environment (then modules that no kept code
    imports any more are dropped)."""
    names = set(modules) | set(ALWAYS)
    for m in list(names):
        parts = m.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    names = {n for n in names if not n.startswith(TOOLING)}
    raw = {n: module_source(n) for n in sorted(names)}
    folding = "" if fold is None else json.dumps([to_dict(fold), sorted(live or ())], sort_keys=True)
    key = hashlib.sha256("\0".join([folding] + [f"{n}\0{s}" for n, s in raw.items()]).encode()).hexdigest()
    if key not in _PREPARED:  # a run estimates its bundle twice (at start and at export)
        if fold is None:
            shaken = shake(raw, {"main"})
        else:
            from pgolf.train.fold import fold_sources

            shaken, _report = fold_sources(raw, fold, set(live or ()), {"main"}, set(ALWAYS))
        out = {n: minify(s, n) for n, s in shaken.items()}
        out.update(package_data(out))
        _PREPARED.clear()
        _PREPARED[key] = out
    out = dict(_PREPARED[key])
    if check:
        check_closed({n: s for n, s in out.items() if "/" not in n})
    return out, sum(len(s.encode()) for s in raw.values())


_PREPARED: dict[str, dict[str, str]] = {}  # the last prepare_sources result, by its raw sources


def package_data(modules: dict[str, str]) -> dict[str, str]:
    """The package data files (e.g. preset TOML) that the bundled code can read: files of a package
    that bundled code opens with ``resources.files("<package>")``, whose stem is a string constant
    of the code (``load_config("pr401", ...)``). Keys are paths ("pgolf/config/presets/pr401.toml");
    full-line TOML comments and blank lines are dropped."""
    names: set[str] = set()
    opened: set[str] = set()
    for src in modules.values():
        for n in ast.walk(ast.parse(src)):
            if isinstance(n, ast.Constant) and isinstance(n.value, str):
                names.add(n.value)
            elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "files" and n.args
                  and isinstance(n.args[0], ast.Constant) and n.args[0].value in modules):
                opened.add(n.args[0].value)
    out = {}
    for pkg in sorted(opened):
        root = Path(next(iter(importlib.util.find_spec(pkg).submodule_search_locations)))
        for f in sorted(root.rglob("*")):
            rel = f.relative_to(root)
            if not f.is_file() or f.suffix in (".py", ".pyc") or "__pycache__" in rel.parts or f.stem not in names:
                continue
            text = f.read_text(encoding="utf-8")
            if f.suffix == ".toml":
                text = "".join(line for line in text.splitlines(True) if line.strip() and not line.lstrip().startswith("#"))
            out[pkg.replace(".", "/") + "/" + rel.as_posix()] = text
    return out


def _pgolf_imports(src: str, top_level_only: bool) -> set[str]:
    """pgolf modules an import statement of ``src`` names: ``from pgolf.x import y`` names
    pgolf.x, and pgolf.x.y when that is a module."""
    tree = ast.parse(src)
    out: set[str] = set()
    for st in tree.body if top_level_only else ast.walk(tree):
        if isinstance(st, ast.Import):
            out.update(a.name for a in st.names if a.name.split(".")[0] == "pgolf")
        elif _pgolf_from_import(st):
            out.add(st.module)
            out.update(c for c in (f"{st.module}.{a.name}" for a in st.names) if _is_module(c))
    return out


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, AttributeError, ValueError):  # e.g. "pgolf.model.config.ModelConfig"
        return False


def check_closed(sources: dict[str, str]) -> None:
    """Every module-level pgolf import of the bundled sources must be bundled too (module-level
    imports always run). Fails if the package changed while bundling, for example."""
    for name, src in sources.items():
        missing = sorted(_pgolf_imports(src, top_level_only=True) - set(sources))
        if missing:
            raise CodePackError(f"{name} imports {missing[0]}, which the probe run did not load; "
                              "did the package change while bundling? run pgolf bundle again")


# ------------------------------------------------------------------------------------------------
# pack


def codec_functions(wrapper: str):
    """(compress, decompress) of a wrapper's codec, imported when used."""
    if wrapper == "lzma":
        return (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME)), lzma.decompress
    if wrapper == "brotli":
        import brotli

        return (lambda b: brotli.compress(b, quality=11, lgwin=24)), brotli.decompress
    import zstandard

    return zstandard.ZstdCompressor(level=22).compress, zstandard.ZstdDecompressor().decompress


def codec_of(wrapper: str) -> str | None:
    """The compressor a wrapper uses (None for ``plain``)."""
    return None if wrapper == "plain" else wrapper.removesuffix("-latin1")


def latin1_literal(blob: bytes) -> str:
    """``blob`` as the body of a single-quoted string literal of a latin-1 source file."""
    return "".join(_LATIN1_TABLE[b] for b in blob)


def file_encoding(data: bytes) -> str:
    """The encoding a bundled file declares: latin-1 when its first line has the cookie."""
    return "latin-1" if LATIN1_COOKIE.encode() in data.split(b"\n", 1)[0] else "utf-8"


def render(modules: dict[str, str], config: dict[str, Any], wrapper: str, header: str = "") -> bytes:
    """The bundled file's bytes with one wrapper (see the module docstring)."""
    assert wrapper in WRAPPERS, wrapper
    parts = [LAUNCHER, json.dumps(config, separators=(",", ":"), sort_keys=True)]
    for name in sorted(modules):
        parts += [name, modules[name]]
    assert not any("\0" in p for p in parts)
    latin1 = wrapper.endswith("-latin1")
    head = f"# {'; '.join(filter(None, (header, LATIN1_COOKIE if latin1 else '')))}\n" if header or latin1 else ""
    if wrapper == "plain":
        return f"{head}S={parts!r}\nexec(S[0])\n".encode("utf-8")
    codec = codec_of(wrapper)
    blob = codec_functions(codec)[0]("\0".join(parts).encode("utf-8"))
    mod = CODEC_MODULE[codec]
    if latin1:
        body = f"import {mod};S={mod}.decompress('{latin1_literal(blob)}'.encode('latin-1'))"
    else:
        body = f"import {mod},base64;S={mod}.decompress(base64.b85decode('{base64.b85encode(blob).decode('ascii')}'))"
    return f"{head}{body}.decode().split('\\0');exec(S[0])\n".encode("latin-1" if latin1 else "ascii")


def header_line(config: dict[str, Any], modules: dict[str, str], wrapper: str) -> str:
    """The file's first line (a comment): what made it and from what."""
    import pgolf

    n = sum("/" not in name for name in modules)  # data files ("pgolf/config/...") are not modules
    return f"pgolf {pgolf.__version__} bundle: preset {config.get('preset')}, profile {config.get('profile')}; {n} modules, {wrapper}"


def pack(modules: dict[str, str], config: dict[str, Any], wrapper: str = "auto") -> tuple[bytes, str, dict[str, int]]:
    """(file bytes, chosen wrapper, {wrapper: bytes}); ``auto`` keeps the smallest."""
    tried = WRAPPERS if wrapper == "auto" else (wrapper,)
    texts = {w: render(modules, config, w, header_line(config, modules, w)) for w in tried}
    sizes = {w: len(t) for w, t in texts.items()}
    best = min(sizes, key=sizes.get)
    return texts[best], best, sizes


def import_closure(roots: set[str]) -> set[str]:
    """``roots`` and every pgolf module they import statically (imports inside functions
    included), with the packages that hold them; tooling (:data:`TOOLING`) left out."""
    names = {n for n in roots if not n.startswith(TOOLING)}
    todo = sorted(names)
    while todo:
        new = {c for c in _pgolf_imports(module_source(todo.pop()), top_level_only=False) if not c.startswith(TOOLING)} - names
        names |= new
        todo += sorted(new)
    return names | {name.rsplit(".", 1)[0] for name in names if "." in name}


def estimate_code_bytes(module_names: list[str], cfg: RunConfig | None = None) -> int:
    """Upper bound on ``pgolf bundle``'s file for a run that has loaded ``module_names``: those
    modules plus every pgolf module they could import lazily, shaken, minified and packed with
    lzma as a latin-1 literal (``pgolf bundle`` keeps the smallest wrapper, one of which this is).
    Without ``cfg`` the embedded config is the full default config, longer than any real bundle's
    (which stores only the changed keys)."""
    names = import_closure({n for n in module_names if n.split(".")[0] == "pgolf"} | set(ALWAYS))
    modules, _raw = prepare_sources(sorted(names), check=False)
    config = bundle_config(cfg) if cfg is not None else to_dict(RunConfig())
    return len(render(modules, config, "lzma-latin1", header_line(config, modules, "lzma-latin1")))


# ------------------------------------------------------------------------------------------------
# the command


def package_code_bytes(cfg=None) -> int:
    """Upper bound on the code bytes of this run's submission: the size of the single-file
    ``train_gpt.py`` that ``pgolf bundle`` would generate from every pgolf module the launcher's
    entry point can import, lazy imports included (command-line and submission tooling excluded),
    shaken, minified and lzma-packed (latin-1 literal) with ``cfg`` embedded (the full default
    config if None). The set is the static import closure of :data:`ALWAYS`, never the modules this
    process happens to have loaded: the same config gives the same count in a test process that
    imported everything and in a fresh child (pgolf imports no module of its own by a computed
    name, so the closure holds every module a run can load). ``pgolf bundle`` writes the real file,
    smaller (only the modules a probe run loads, the best wrapper); a bundled train_gpt.py passes
    its exact size as ``code_bytes`` instead."""
    return estimate_code_bytes(list(ALWAYS), cfg)
