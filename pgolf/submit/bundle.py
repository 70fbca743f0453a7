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
3. **Fold** (:mod:`pgolf.train.fold`; ``--no-fold`` skips it). The file runs one configuration:
   reads of settings it cannot take from the environment become their values, branches on
   constants go, and shaking again drops what only those branches reached (functions, classes,
   whole modules), until nothing changes. Settings the script reads from the environment (the
   challenge's variables, the ones the verification run shrinks) stay live; a ``PGOLF_*`` variable
   naming a folded setting is an error in the script.
4. **Minify** each module with python-minifier (globals keep their names: other modules import
   them; docstrings and annotations go, except class-level ones, which dataclasses need).
5. **Pack.** A launcher installs a ``sys.meta_path`` importer at position 0 that serves ``pgolf.*``
   from the embedded sources only (a module that is not embedded is an ImportError, never the
   installed package), then calls ``pgolf.submit.entry.main(config, __file__)``. The launcher, the
   resolved config (JSON) and the sources are NUL-joined and stored either as plain literals or
   compressed (lzma, brotli or zstd), the compressed bytes written either as base85 (an ASCII
   file, +25%) or as one latin-1 string literal (``*-latin1``: the file declares
   ``coding: latin-1`` on its first line, so every byte 0x01-0xFF except ``\\ ' CR LF`` stands
   for itself; those and NUL are escaped, +2.7% on random bytes), whichever file is smallest.
   The latin-1 file is valid Python source (tested on CPython 3.10-3.13) but not UTF-8 text, so
   editors and diffs show it as binary: ``--wrapper brotli`` keeps an ASCII file.
6. **Verify.** Run the written file on the probe data in a subprocess and check that it trained,
   wrote its artifact, ran on its embedded code only and logged its own size as the code bytes.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgolf.config import RunConfig
from pgolf.train.codesize import (
    CODEC_MODULE,
    TOOLING,
    WRAPPERS,
    CodePackError,
    codec_functions,
    bundle_config,
    file_encoding,
    pack,
    prepare_sources,
)
from pgolf.submit.seeds import clean_env, make_probe_data, probe_modules, probe_overrides, run_subprocess

class BundleError(CodePackError):
    """The bundle could not be generated, read, or did not pass its verification run."""


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
    folded: bool = False

    def describe(self) -> str:
        others = ", ".join(f"{k} {v:,}" for k, v in sorted(self.sizes.items(), key=lambda kv: kv[1]) if k != self.wrapper)
        return (f"{self.path}: {self.bytes:,} bytes ({self.wrapper}; also tried: {others}); {len(self.modules)} modules, "
                f"{self.source_bytes:,} bytes of source -> {self.minified_bytes:,} " + ("folded and " * self.folded) + "minified"
                + ("; verified by a run" * self.verified))


# ------------------------------------------------------------------------------------------------
# the configuration a bundle embeds
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
            parts = codec_functions(codec)[1](blob).decode("utf-8").split("\0")
        else:
            assign = next(st for st in ast.parse(text).body if isinstance(st, ast.Assign) and ast.unparse(st.targets[0]) == "S")
            parts = ast.literal_eval(assign.value)
        return json.loads(parts[1]), dict(zip(parts[2::2], parts[3::2]))
    except Exception as exc:  # noqa: BLE001 - any decoding problem means "not a pgolf bundle"
        raise BundleError(f"{path} is not a file made by pgolf bundle ({type(exc).__name__}: {exc})") from None


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def build_bundle(cfg: RunConfig, out: str | Path, *, wrapper: str = "auto", verify: bool = True,
                 keep_data_paths: bool = False, timeout: float = 600.0, fold: bool = True) -> BundleResult:
    """Generate ``out`` (a train_gpt.py) for ``cfg``; see the module docstring. ``fold=False``
    skips step 3 (the file then honours every ``PGOLF_*`` setting variable, for more bytes)."""
    if wrapper not in WRAPPERS + ("auto",):
        raise BundleError(f"--wrapper {wrapper!r}: choose auto, {', '.join(WRAPPERS)}")
    out = Path(out)
    config = bundle_config(cfg, keep_data_paths=keep_data_paths)
    overrides = probe_overrides(cfg)
    with tempfile.TemporaryDirectory(prefix="pgolf-bundle-") as tmp:
        work = Path(tmp)
        data, tok = make_probe_data(work / "data", cfg.model.vocab_size, cfg.data.transform)
        loaded = probe_modules(config, overrides, data, tok, work, timeout)
        used = [m for m in loaded if m.split(".")[0] == "pgolf"]
        leaked = [m for m in used if m.startswith(TOOLING)]
        if leaked:
            raise BundleError(f"the training run imported tooling module(s) {', '.join(leaked)}; a bundle cannot carry them")
        if fold:
            from pgolf.config import from_dict

            modules, raw_bytes = prepare_sources(used, fold=from_dict(config), live=live_settings(cfg))
        else:
            modules, raw_bytes = prepare_sources(used)
        text, chosen, sizes = pack(modules, config, wrapper)
        write_bytes_atomic(out, text)
        result = BundleResult(
            path=out, bytes=out.stat().st_size, wrapper=chosen, sizes=sizes, modules=sorted(m for m in modules if "/" not in m),
            source_bytes=raw_bytes,
            minified_bytes=sum(len(s.encode()) for m, s in modules.items() if "/" not in m), config=config, folded=fold,
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


def live_settings(cfg) -> set[str]:
    """``section.key`` settings the bundled script may take from the environment at run time: the
    challenge's variables, what the verification run shrinks, and what the audit's causality check
    sets; the fold (pgolf.train.fold) leaves them as reads."""
    from pgolf.config.envvars import CHALLENGE_ENV
    from pgolf.submit.seeds import probe_overrides
    from pgolf.train.fold import AUDIT_SETTINGS

    return set(CHALLENGE_ENV.values()) | set(probe_overrides(cfg)) | set(AUDIT_SETTINGS)
