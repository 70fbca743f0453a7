"""``pgolf audit RECORD_DIR``: check a record folder the way the challenge's reviewers do.

One line per rule, PASS / FAIL / SKIP with the reason; exit code 1 if any rule fails. The numbers
come from the files themselves (the logs, the script's size on disk, its embedded configuration),
never from what ``submission.json`` claims about them:

=============  ===================================================================================
files          README.md, submission.json, train_gpt.py, requirements.txt and train logs present
submission     submission.json has the challenge's fields with the right types
seeds          distinct seeds, at least ``--min-seeds``, the same as submission.json's per-seed list
code bytes     bytes_code == the size of train_gpt.py on disk
bytes total    bytes_total == size of train_gpt.py + the largest model of the logs
cap            that total <= 16,000,000 bytes (decimal)
train time     every log's training time <= 600 s (GPTQ calibration included when logged)
eval time      every log's final evaluations (sum of their eval_time) <= 600 s
one config     every log has the same configuration (train.seed aside)
script config  train_gpt.py embeds that configuration (seed and data paths aside)
score          val_loss / val_bpb == the mean of the logs' score lines
full val       every run evaluated the whole validation split (the logged count equals the data
               manifest's, cut to whole windows as the challenge does; an eval.max_val_tokens that
               cut the split fails, one that cannot be checked without the manifest fails too)
disjoint       no training document is a validation document (manifest doc hashes)
causality      the token-flip test of pgolf.eval.causality on the script's own code (plain,
               sliding, and the configured TTT: score-first, or phased on BOS-separated documents)
=============  ===================================================================================

The time limits are defined for 8 x H100 SXM: the rules read the logged numbers, they do not
judge the hardware the logs came from (the table says which). The causality rule runs the
script's embedded model and evaluation code (not the installed pgolf) at a reduced width with
random weights on random tokens: causality is a property of the code, not of the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pgolf.errors import UserError
from pgolf.submit.record import CAP_BYTES, REQUIRED_FILES, SUBMISSION_FIELDS, config_differences, config_hash
from pgolf.submit.stats import LogFacts, mean_std, parse_log

TIME_LIMIT_S = 600.0
SCORE_TOLERANCE = 5e-9  # the logs print 8 decimals; the mean of those is what submission.json holds


@dataclass
class Rule:
    name: str
    status: str  # PASS | FAIL | SKIP
    reason: str


class Skip(Exception):
    """Raised by a rule that cannot be checked here (SKIP with this reason)."""


class Record:
    """Lazily read facts of a record folder."""

    def __init__(self, folder: Path, data: Path | None):
        self.folder, self.data = folder, data
        self._sub: dict[str, Any] | None = None
        self._logs: list[LogFacts] | None = None

    @property
    def script(self) -> Path:
        return self.folder / "train_gpt.py"

    @property
    def submission(self) -> dict[str, Any]:
        if self._sub is None:
            path = self.folder / "submission.json"
            if not path.is_file():
                raise UserError("submission.json is missing")
            try:
                self._sub = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UserError(f"submission.json is not valid JSON ({exc})") from None
            if not isinstance(self._sub, dict):
                raise UserError("submission.json is not a JSON object")
        return self._sub

    @property
    def logs(self) -> list[LogFacts]:
        if self._logs is None:
            files = sorted(self.folder.glob("train_seed*.log"))
            if not files:
                raise UserError("no train_seed*.log files")
            self._logs = [parse_log(f) for f in files]
        return self._logs

    def script_bytes(self) -> int:
        if not self.script.is_file():
            raise UserError("train_gpt.py is missing")
        return self.script.stat().st_size

    def model_bytes(self) -> int:
        missing = [Path(f.path).name for f in self.logs if f.model_bytes is None]
        if missing:
            raise UserError(f"{missing[0]} has no 'Serialized model ...: N bytes' line")
        return max(f.model_bytes for f in self.logs)

    def config(self) -> dict[str, Any]:
        missing = [Path(f.path).name for f in self.logs if f.config is None]
        if missing:
            raise UserError(f"{missing[0]} has no config line")
        return self.logs[0].config


# ------------------------------------------------------------------------------------------------
# rules: each returns the PASS reason, raises UserError (FAIL) or Skip


def rule_files(r: Record) -> str:
    missing = [f for f in REQUIRED_FILES if not (r.folder / f).is_file()]
    logs = sorted(r.folder.glob("train_seed*.log"))
    if not logs:
        missing.append("train_seed*.log")
    if missing:
        raise UserError(f"missing: {', '.join(missing)}")
    return f"{', '.join(REQUIRED_FILES)} and {len(logs)} train logs"


def _typed(value: Any, typ: type) -> bool:
    """JSON type check: a float field takes any number, and a bool is never a number."""
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if typ is float else isinstance(value, typ)


def rule_submission(r: Record) -> str:
    sub = r.submission
    problems = []
    for key, typ in SUBMISSION_FIELDS.items():
        value = sub.get(key)
        if not _typed(value, typ):
            problems.append(f"{key} {'missing' if key not in sub else f'is {type(value).__name__}, expected {typ.__name__}'}")
    if problems:
        raise UserError("; ".join(problems))
    return f"fields {', '.join(SUBMISSION_FIELDS)} present and typed"


def rule_seeds(r: Record, min_seeds: int) -> str:
    seeds = [f.seed for f in r.logs]
    if None in seeds:
        raise UserError(f"{Path(r.logs[seeds.index(None)].path).name} names no seed")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"seeds repeat: {seeds}")
    if len(seeds) < min_seeds:
        raise UserError(f"{len(seeds)} seed(s) {seeds}; a record needs at least {min_seeds} (p < 0.01 over several runs)")
    listed = [s.get("seed") for s in r.submission.get("seed_results", []) if isinstance(s, dict)]
    if listed and sorted(listed) != sorted(seeds):
        raise UserError(f"submission.json lists seeds {sorted(listed)}, the logs {sorted(seeds)}")
    return f"{len(seeds)} distinct seeds {seeds}"


def rule_code_bytes(r: Record) -> str:
    size, claimed = r.script_bytes(), r.submission.get("bytes_code")
    if claimed != size:
        raise UserError(f"bytes_code {claimed} but train_gpt.py has {size:,} bytes")
    return f"train_gpt.py is {size:,} bytes"


def rule_bytes_total(r: Record) -> str:
    total = r.script_bytes() + r.model_bytes()
    claimed = r.submission.get("bytes_total")
    if claimed != total:
        raise UserError(f"bytes_total {claimed} but code {r.script_bytes():,} + largest model {r.model_bytes():,} = {total:,}")
    return f"{total:,} = code {r.script_bytes():,} + largest model {r.model_bytes():,}"


def rule_cap(r: Record) -> str:
    total = r.script_bytes() + r.model_bytes()
    if total > CAP_BYTES:
        raise UserError(f"{total:,} bytes is {total - CAP_BYTES:,} over the {CAP_BYTES:,}-byte cap")
    return f"{total:,} <= {CAP_BYTES:,} ({CAP_BYTES - total:,} to spare)"


def _hardware(r: Record) -> str:
    env = r.logs[0].env
    return env.get("gpu") and f"{env.get('gpu_count', '?')} x {env['gpu']}" or env.get("device", "unknown hardware")


def rule_time(r: Record, what: str) -> str:
    values = []
    for f in r.logs:
        v = f.train_seconds if what == "train" else f.eval_seconds
        if v is None:
            raise UserError(f"{Path(f.path).name} logs no {'step train_time' if what == 'train' else 'final eval_time'}")
        values.append(v)
    worst = max(values)
    numbers = ", ".join(f"{v:.1f}" for v in values)
    if worst > TIME_LIMIT_S:
        raise UserError(f"{what} {numbers} s: {worst:.1f} s > {TIME_LIMIT_S:.0f} s")
    return f"{what} {numbers} s <= {TIME_LIMIT_S:.0f} s (limit defined for 8xH100; logs from {_hardware(r)})"


def rule_one_config(r: Record) -> str:
    first = r.config()
    for f in r.logs[1:]:
        diff = config_differences(first, f.config)
        if diff:
            raise UserError(f"{Path(f.path).name} differs from {Path(r.logs[0].path).name} in {', '.join(diff[:6])}")
    return f"{len(r.logs)} logs share config {config_hash(first)} (train.seed aside)"


def rule_script_config(r: Record) -> str:
    from pgolf.config import from_dict, to_dict
    from pgolf.submit.bundle import BundleError, read_bundle

    try:
        embedded, _ = read_bundle(r.script)
    except BundleError:
        raise Skip("train_gpt.py is not a pgolf bundle; its configuration cannot be read") from None
    logged = r.config()
    diff = [k for k in config_differences(to_dict(from_dict(embedded)), to_dict(from_dict(logged))) if not k.startswith("data.")]
    if diff:
        raise UserError(f"train_gpt.py embeds a different configuration ({', '.join(diff[:6])})")
    return "train_gpt.py embeds the logged configuration (seed and data paths aside)"


def rule_score(r: Record) -> str:
    scores = [f.score for f in r.logs]
    if None in scores:
        raise UserError(f"{Path(r.logs[scores.index(None)].path).name} has no final_*_exact score line")
    names = sorted({f.score_line for f in r.logs})
    loss, _ = mean_std([s[0] for s in scores])
    bpb, _ = mean_std([s[1] for s in scores])
    sub = r.submission
    bad = [f"{k} {sub.get(k)} != {v:.8f}" for k, v in (("val_loss", loss), ("val_bpb", bpb))
           if not isinstance(sub.get(k), (int, float)) or not math.isclose(sub[k], v, rel_tol=0, abs_tol=SCORE_TOLERANCE)]
    if bad:
        raise UserError(f"submission.json {'; '.join(bad)} (mean of {', '.join(names)})")
    return f"val_bpb {bpb:.8f}, val_loss {loss:.8f} = mean of {len(scores)} logs' {'/'.join(names)}"


def _data_folder(r: Record) -> Path:
    return r.data or Path(r.config().get("data", {}).get("path", ""))


def rule_full_val(r: Record) -> str:
    from pgolf.data.manifest import MANIFEST_NAME, read_manifest

    caps = set()
    for f in r.logs:
        caps.add((f.config or {}).get("eval", {}).get("max_val_tokens", 0))
        if f.val_tokens is None:
            raise UserError(f"{Path(f.path).name} logs no val_loader tokens count")
    counts = sorted({f.val_tokens for f in r.logs})
    folder = _data_folder(r)
    if not (folder / MANIFEST_NAME).is_file():
        # eval.max_val_tokens only cuts a split longer than it; without the manifest that cannot be checked
        if any(caps):
            raise UserError(f"the runs set eval.max_val_tokens={max(caps):,} and the data folder {folder} is not here to "
                            "show that the whole split was scored (pass --data DIR)")
        return f"no eval.max_val_tokens prefix; {counts[0]:,} targets (data folder {folder} not here to count them)"
    cfg = r.config()
    train_len = cfg.get("train", {}).get("train_seq_len", 0)
    window = max(train_len, cfg.get("eval", {}).get("eval_seq_len", 0) or train_len)
    total = read_manifest(folder)["val"]["tokens"]
    expected = (total - 1) // window * window
    if counts != [expected]:
        cut = f" (eval.max_val_tokens={max(caps):,} scored a prefix)" if any(caps) else ""
        raise UserError(f"logged {', '.join(map(str, counts))} validation targets; {folder} holds {total:,} tokens = "
                        f"{expected:,} targets in {window}-token windows{cut}")
    return f"{expected:,} targets = all {total:,} validation tokens of {folder} in {window}-token windows"


def rule_disjoint(r: Record) -> str:
    from pgolf.data.manifest import MANIFEST_NAME, check_disjoint

    cfg = r.config()
    folder = _data_folder(r)
    if not (folder / MANIFEST_NAME).is_file():
        raise Skip(f"data folder {folder} with its {MANIFEST_NAME} is not here (pass --data DIR)")
    res = check_disjoint(folder, cfg.get("data", {}).get("train_glob", "fineweb_train_*.bin"), progress=True)
    if res["overlapping_docs"]:
        raise UserError(f"{res['overlapping_docs']} training documents of {folder} are validation documents "
                        f"(e.g. hash {res['overlap_hashes'][0]})")
    return f"{res['train_docs']:,} training docs in {res['train_files']} shards of {folder}, none of the {res['val_docs']:,} validation docs"


_CAUSALITY = r"""
import json, sys, torch
S = json.load(open(sys.argv[1]))
exec(S[0], {"S": S, "__name__": "pgolf_audit"})  # installs the bundle's importer; does not train
from pgolf.config import from_dict, set_value
from pgolf.model.gpt import build_model
from pgolf.eval.bpb import ByteLUT
from pgolf.eval.causality import check_causality
cfg = from_dict(json.loads(S[1]))
for k, v in json.loads(sys.argv[2]).items():
    set_value(cfg, k, v)
cfg.validate()
torch.manual_seed(0)
model = build_model(cfg.model, "cpu")
with torch.no_grad():  # generic weights: zero-initialised projections would hide any leak
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
model.eval()
V = cfg.model.vocab_size
lut = ByteLUT(torch.ones(V, dtype=torch.int16), torch.zeros(V, dtype=torch.bool), torch.zeros(V, dtype=torch.bool))
seq, stride = 64, 16
tokens = torch.randint(2, V, (4 * seq + 1,), generator=torch.Generator().manual_seed(0))
modes = ["plain"] + (["sliding"] if cfg.eval.sliding_stride else []) + {"off": [], "phased": ["phased"]}.get(cfg.ttt.mode, ["ttt"])
cfg.ttt.chunk_tokens = seq
if cfg.ttt.mode == "phased":  # documents (BOS every 12-40 tokens), and a protocol scaled to them
    g, p = torch.Generator().manual_seed(1), 0
    while p < tokens.numel() - 1:
        tokens[p] = cfg.model.bos_id
        p += int(torch.randint(12, 41, (1,), generator=g))
    for k, v in {"batch_docs": 3, "prefix_docs": 6, "phases": 2, "doc_chunk": 16, "seq_len": 32, "chunk_tokens": 64}.items():
        setattr(cfg.ttt, k, v)
out = []
for mode in modes:
    rep = check_causality(model, tokens, lut, mode=mode, seq_len=seq, stride=stride, positions=int(sys.argv[4]), ttt_cfg=cfg.ttt)
    out.append(rep.as_dict())
json.dump(out, open(sys.argv[3], "w"))
"""


def rule_causality(r: Record, positions: int) -> str:
    import importlib.util

    from pgolf.submit.bundle import BundleError, read_bundle
    from pgolf.train.codesize import LAUNCHER
    from pgolf.submit.seeds import clean_env, probe_overrides, run_subprocess

    spec = importlib.util.find_spec("pgolf.eval.causality")
    if spec is None or spec.origin is None:
        raise Skip("not available (pgolf.eval.causality is not in this checkout)")
    from pgolf.eval import causality

    if not hasattr(causality, "check_causality"):
        raise Skip("not available (pgolf.eval.causality has no check_causality)")
    try:
        embedded, modules = read_bundle(r.script)
    except BundleError:
        raise Skip("train_gpt.py is not a pgolf bundle; its code cannot be loaded") from None
    from pgolf.config import from_dict

    cfg = from_dict(embedded)
    shrink = {k: v for k, v in probe_overrides(cfg).items() if k.startswith("model.")}
    # The bundle's own code, plus the check itself (not used by training, so never in a bundle).
    parts = [LAUNCHER, json.dumps(embedded)]
    for name, src in {**modules, "pgolf.eval.causality": Path(spec.origin).read_text(encoding="utf-8")}.items():
        parts += [name, src]
    with tempfile.TemporaryDirectory(prefix="pgolf-audit-") as tmp:
        sources, out = Path(tmp) / "bundle.json", Path(tmp) / "causality.json"
        sources.write_text(json.dumps(parts))
        run_subprocess([sys.executable, "-c", _CAUSALITY, str(sources), json.dumps(shrink), str(out), str(positions)],
             Path(tmp), clean_env(), "the causality check", 600.0)
        reports = json.loads(out.read_text())
    failed = [rep for rep in reports if not rep["passed"]]
    summary = ", ".join(f"{rep['mode']} {'ok' if rep['passed'] else 'LEAKS'} (max |dNLL| {rep['max_diff_before']:.2g})" for rep in reports)
    if failed:
        raise UserError(f"a scored NLL changed when a later token changed: {summary}")
    return f"token-flip test on the script's own code, {positions} positions per mode: {summary}"


# ------------------------------------------------------------------------------------------------


RULE_NAMES = ("files", "submission", "seeds", "code bytes", "bytes total", "cap", "train time", "eval time",
              "one config", "script config", "score", "full val", "disjoint", "causality")


def audit(folder: str | Path, *, data: str | Path | None = None, min_seeds: int = 3, positions: int = 8,
          skip: tuple[str, ...] = ()) -> list[Rule]:
    """Every rule's result for the record folder ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; pass a record folder made by pgolf record")
    r = Record(folder, Path(data) if data else None)
    checks: dict[str, Callable[[], str]] = {
        "files": lambda: rule_files(r),
        "submission": lambda: rule_submission(r),
        "seeds": lambda: rule_seeds(r, min_seeds),
        "code bytes": lambda: rule_code_bytes(r),
        "bytes total": lambda: rule_bytes_total(r),
        "cap": lambda: rule_cap(r),
        "train time": lambda: rule_time(r, "train"),
        "eval time": lambda: rule_time(r, "eval"),
        "one config": lambda: rule_one_config(r),
        "script config": lambda: rule_script_config(r),
        "score": lambda: rule_score(r),
        "full val": lambda: rule_full_val(r),
        "disjoint": lambda: rule_disjoint(r),
        "causality": lambda: rule_causality(r, positions),
    }
    assert tuple(checks) == RULE_NAMES
    results = []
    for name, check in checks.items():
        if name in skip:
            results.append(Rule(name, "SKIP", "skipped (--skip)"))
            continue
        try:
            results.append(Rule(name, "PASS", check()))
        except Skip as exc:
            results.append(Rule(name, "SKIP", str(exc)))
        except UserError as exc:
            results.append(Rule(name, "FAIL", str(exc)))
        except Exception as exc:  # noqa: BLE001 - a rule that cannot be evaluated is not a pass
            results.append(Rule(name, "FAIL", f"could not check ({type(exc).__name__}: {exc})"))
    return results


def format_table(rules: list[Rule]) -> str:
    width = max(len(r.name) for r in rules)
    lines = [f"{'rule':<{width}}  status  reason", "-" * (width + 2 + 6 + 2 + 60)]
    lines += [f"{r.name:<{width}}  {r.status:<6}  {r.reason}" for r in rules]
    counts = {s: sum(r.status == s for r in rules) for s in ("PASS", "FAIL", "SKIP")}
    verdict = "FAIL" if counts["FAIL"] else "PASS"
    lines.append(f"audit: {counts['PASS']} pass, {counts['FAIL']} fail, {counts['SKIP']} skipped -> {verdict}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgolf audit", description="Audit a record folder: one PASS/FAIL/SKIP line per rule "
                                "with its reason; exit code 1 if any rule fails.")
    p.add_argument("record", metavar="RECORD_DIR", help="the record folder (made by pgolf record)")
    p.add_argument("--data", default=None, help="data folder for the disjointness rule (default: the logs' data.path)")
    p.add_argument("--min-seeds", type=int, default=3, help="seeds a record needs (default 3)")
    p.add_argument("--positions", type=int, default=8, help="token positions the causality rule flips per mode (default 8)")
    p.add_argument("--skip", action="append", default=[], choices=RULE_NAMES, metavar="RULE",
                   help=f"skip a rule (repeatable): {', '.join(RULE_NAMES)}")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def main(argv: list[str]) -> int:
    """``pgolf audit RECORD_DIR [...]``; returns 1 if any rule fails, else 0."""
    args = build_parser().parse_args(argv)
    rules = audit(args.record, data=args.data, min_seeds=args.min_seeds, positions=args.positions, skip=tuple(args.skip))
    if args.json:
        json.dump([vars(r) for r in rules], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"audit of {args.record}")
        print(format_table(rules))
    return 1 if any(r.status == "FAIL" for r in rules) else 0
