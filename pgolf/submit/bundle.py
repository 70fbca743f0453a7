"""``pgolf bundle``: generate the single-file ``train_gpt.py`` of a configuration from the package.

The package stays the single source of truth; the submission file is generated, never written by
hand. Steps:

1. **Probe.** Run the configuration, shrunk to seconds (:mod:`pgolf.submit.seeds`: narrow model,
   2 steps, 64-token sequences, tiny synthetic data) but with every technique switch as configured,
   in a subprocess through the entry point the bundle uses (:mod:`pgolf.submit.entry`), and record which
   ``pgolf.*`` modules it imported. Optional techniques are imported lazily only when a config uses
   them, so this is "exactly the code the preset needs" at module granularity.
2. **Shake.** Drop the top-level functions and classes no kept code can reach (a name-based,
   conservative reachability: a definition stays if its name appears anywhere in kept code, as a
   name, an attribute or a string constant), and the pgolf imports of what was dropped.
3. **Minify** each module with python-minifier (globals keep their names: other modules import
   them; docstrings and annotations go, except class-level ones, which dataclasses need).
4. **Pack.** A launcher installs a ``sys.meta_path`` importer at position 0 that serves ``pgolf.*``
   from the embedded sources only (a module that is not embedded is an ImportError, never the
   installed package), then calls ``pgolf.submit.entry.main(config, __file__)``. The launcher, the
   resolved config (JSON) and the sources are NUL-joined and stored either as plain literals or
   compressed (lzma, brotli or zstd), the compressed bytes written either as base85 (an ASCII
   file, +25%) or as one latin-1 string literal (``*-latin1``: the file declares
   ``coding: latin-1`` on its first line, so every byte 0x01-0xFF except ``\\ ' CR LF`` stands
   for itself; those and NUL are escaped, +2.7% on random bytes), whichever file is smallest.
   The latin-1 file is valid Python source (tested on CPython 3.10-3.13) but not UTF-8 text, so
   editors and diffs show it as binary: ``--wrapper brotli`` keeps an ASCII file.
5. **Verify.** Run the written file on the probe data in a subprocess and check that it trained,
   wrote its artifact, ran on its embedded code only and logged its own size as the code bytes.
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
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgolf.config import RunConfig, diff_from_defaults, to_dict
from pgolf.errors import UserError
from pgolf.submit.seeds import clean_env, make_probe_data, probe_modules, probe_overrides, run_subprocess

#: pgolf modules that never go into a bundle (command line and submission tooling).
TOOLING = ("pgolf.cli", "pgolf.submit.bundle", "pgolf.submit.record", "pgolf.submit.audit", "pgolf.submit.stats", "pgolf.submit.seeds")
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


class BundleError(UserError):
    """The bundle could not be generated or did not pass its verification run."""


@dataclass
class BundleResult:
    path: Path
    bytes: int
    wrapper: str
    sizes: dict[str, int]  # bytes of the file with every wrapper tried
    modules: list[str]
    source_bytes: int  # the bundled modules' original sources
    minified_bytes: int  # the embedded module sources, minified
    config: dict[str, Any] = field(default_factory=dict)
    verified: bool = False

    def describe(self) -> str:
        others = ", ".join(f"{k} {v:,}" for k, v in sorted(self.sizes.items(), key=lambda kv: kv[1]) if k != self.wrapper)
        return (f"{self.path}: {self.bytes:,} bytes ({self.wrapper}; also tried: {others}); {len(self.modules)} modules, "
                f"{self.source_bytes:,} bytes of source -> {self.minified_bytes:,} minified" + ("; verified by a run" * self.verified))


# ------------------------------------------------------------------------------------------------
# the configuration a bundle embeds


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


def _mentions(node: ast.AST) -> set[str]:
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and _IDENT.match(n.value):
            out.add(n.value)  # getattr(obj, "name") and the like
    return out


def _pgolf_from_import(st: ast.stmt) -> bool:
    return isinstance(st, ast.ImportFrom) and st.level == 0 and bool(st.module) and st.module.split(".")[0] == "pgolf"


def shake(sources: dict[str, str], roots: set[str]) -> dict[str, str]:
    """Remove top-level defs/classes that nothing kept mentions; returns the new sources.

    Conservative and name-based: every non-definition top-level statement is kept and its names
    are roots; a definition is kept if its name is mentioned by kept code anywhere (any module),
    so name collisions only ever keep more. Top-level ``from pgolf... import`` statements lose the
    names nothing mentions, so no import asks for a removed definition."""
    trees = {m: ast.parse(s) for m, s in sources.items()}
    seen = set(roots)
    for tree in trees.values():
        for st in tree.body:
            if not isinstance(st, _DEFS) and not _pgolf_from_import(st):
                seen |= _mentions(st)
    kept: set[tuple[str, str]] = set()
    changed = True
    while changed:
        changed = False
        for m, tree in trees.items():
            for st in tree.body:
                if isinstance(st, _DEFS) and (m, st.name) not in kept and st.name in seen:
                    kept.add((m, st.name))
                    seen |= _mentions(st)
                    changed = True
    out = {}
    for m, tree in trees.items():
        body = []
        for st in tree.body:
            if isinstance(st, _DEFS) and (m, st.name) not in kept:
                continue
            if _pgolf_from_import(st):
                st.names = [a for a in st.names if (a.asname or a.name) in seen]
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
            write_text_atomic(cached, text)
        except OSError:
            pass
    _MINIFIED[key] = text
    return text


def prepare_sources(modules: list[str], check: bool = True) -> tuple[dict[str, str], int]:
    """Shaken + minified sources of ``modules`` (with their parent packages) and data files, and
    the raw size. ``check``: every module-level pgolf import must be among them."""
    names = set(modules) | set(ALWAYS)
    for m in list(names):
        parts = m.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    names = {n for n in names if not n.startswith(TOOLING)}
    raw = {n: module_source(n) for n in sorted(names)}
    key = hashlib.sha256("\0".join(f"{n}\0{s}" for n, s in raw.items()).encode()).hexdigest()
    if key not in _PREPARED:  # a run estimates its bundle twice (at start and at export)
        shaken = shake(raw, {"main"})
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
            raise BundleError(f"{name} imports {missing[0]}, which the probe run did not load; "
                              "did the package change while bundling? run pgolf bundle again")


# ------------------------------------------------------------------------------------------------
# pack


def _codec(wrapper: str):
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
    blob = _codec(codec)[0]("\0".join(parts).encode("utf-8"))
    mod = CODEC_MODULE[codec]
    if latin1:
        body = f"import {mod};S={mod}.decompress('{latin1_literal(blob)}'.encode('latin-1'))"
    else:
        body = f"import {mod},base64;S={mod}.decompress(base64.b85decode('{base64.b85encode(blob).decode('ascii')}'))"
    return f"{head}{body}.decode().split('\\0');exec(S[0])\n".encode("latin-1" if latin1 else "ascii")


def read_bundle(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(embedded config, {module: source}) of a file made by :func:`render`, without running it.
    Raises BundleError for any other file."""
    data = Path(path).read_bytes()
    try:
        text = data.decode(file_encoding(data))
        m85 = re.search(r"import (lzma|brotli|zstandard),base64;S=\1\.decompress\(base64\.b85decode\('([^']*)'\)\)", text)
        m1 = re.search(r"import (lzma|brotli|zstandard);S=\1\.decompress\(('(?:[^'\\\n]|\\.)*')\.encode\('latin-1'\)\)", text)
        if m85 or m1:
            m = m85 or m1
            codec = {v: k for k, v in CODEC_MODULE.items()}[m.group(1)]
            blob = base64.b85decode(m.group(2)) if m85 else ast.literal_eval(m.group(2)).encode("latin-1")
            parts = _codec(codec)[1](blob).decode("utf-8").split("\0")
        else:
            assign = next(st for st in ast.parse(text).body if isinstance(st, ast.Assign) and ast.unparse(st.targets[0]) == "S")
            parts = ast.literal_eval(assign.value)
        return json.loads(parts[1]), dict(zip(parts[2::2], parts[3::2]))
    except Exception as exc:  # noqa: BLE001 - any decoding problem means "not a pgolf bundle"
        raise BundleError(f"{path} is not a file made by pgolf bundle ({type(exc).__name__}: {exc})") from None


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


def estimate_code_bytes(module_names: list[str], cfg: RunConfig | None = None) -> int:
    """Upper bound on ``pgolf bundle``'s file for a run that has loaded ``module_names``: those
    modules plus every pgolf module they could import lazily, shaken, minified and packed with
    lzma as a latin-1 literal (``pgolf bundle`` keeps the smallest wrapper, one of which this is).
    Without ``cfg`` the embedded config is the full default config, longer than any real bundle's
    (which stores only the changed keys)."""
    names = {n for n in module_names if n.split(".")[0] == "pgolf" and not n.startswith(TOOLING)} | set(ALWAYS)
    todo = list(names)
    while todo:  # close over static pgolf imports (lazy ones included)
        new = {c for c in _pgolf_imports(module_source(todo.pop()), top_level_only=False) if not c.startswith(TOOLING)} - names
        names |= new
        todo += sorted(new)
    modules, _raw = prepare_sources(sorted(names), check=False)
    config = bundle_config(cfg) if cfg is not None else to_dict(RunConfig())
    return len(render(modules, config, "lzma-latin1", header_line(config, modules, "lzma-latin1")))


# ------------------------------------------------------------------------------------------------
# the command


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def build_bundle(cfg: RunConfig, out: str | Path, *, wrapper: str = "auto", verify: bool = True,
                 keep_data_paths: bool = False, timeout: float = 600.0) -> BundleResult:
    """Generate ``out`` (a train_gpt.py) for ``cfg``; see the module docstring."""
    if wrapper not in WRAPPERS + ("auto",):
        raise BundleError(f"--wrapper {wrapper!r}: choose auto, {', '.join(WRAPPERS)}")
    out = Path(out)
    config = bundle_config(cfg, keep_data_paths=keep_data_paths)
    overrides = probe_overrides(cfg)
    with tempfile.TemporaryDirectory(prefix="pgolf-bundle-") as tmp:
        work = Path(tmp)
        data, tok = make_probe_data(work / "data", cfg.model.vocab_size)
        loaded = probe_modules(config, overrides, data, tok, work, timeout)
        used = [m for m in loaded if m.split(".")[0] == "pgolf"]
        leaked = [m for m in used if m.startswith(TOOLING)]
        if leaked:
            raise BundleError(f"the training run imported tooling module(s) {', '.join(leaked)}; a bundle cannot carry them")
        modules, raw_bytes = prepare_sources(used)
        text, chosen, sizes = pack(modules, config, wrapper)
        write_bytes_atomic(out, text)
        result = BundleResult(
            path=out, bytes=out.stat().st_size, wrapper=chosen, sizes=sizes, modules=sorted(m for m in modules if "/" not in m),
            source_bytes=raw_bytes,
            minified_bytes=sum(len(s.encode()) for m, s in modules.items() if "/" not in m), config=config,
        )
        assert result.bytes == sizes[chosen]
        if verify:
            verify_bundle(out, overrides, data, tok, work / "verify", timeout)
            result.verified = True
    return result


def verify_bundle(script: Path, overrides: dict[str, Any], data: Path, tokenizer: Path, workdir: Path,
                  timeout: float = 600.0) -> dict[str, Any]:
    """Run ``script`` shrunk by ``overrides`` on ``data`` in ``workdir``; check it used only its
    embedded code and logged its own size as the code bytes. Returns the run's summary."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = clean_env(overrides, DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), RUN_ID="verify")
    stdout = run_subprocess([sys.executable, str(script.resolve())], workdir, env, f"the verification run of {script}", timeout)
    if "code_source:bundle" not in stdout:
        raise BundleError(f"{script} did not run on its embedded code only (no code_source:bundle line)")
    summary_path = workdir / "logs" / "verify" / "summary.json"
    if not summary_path.is_file():
        raise BundleError(f"the verification run of {script} wrote no {summary_path}")
    summary = json.loads(summary_path.read_text())
    size = script.stat().st_size
    if summary.get("code_bytes") != size:
        raise BundleError(f"{script} logged code bytes {summary.get('code_bytes')}, but the file has {size}")
    return summary
