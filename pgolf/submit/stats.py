"""Per-seed results and the challenge's significance test.

A new record must beat the current one by at least 0.005 nats of val_loss at p < 0.01 (README of
the challenge; field-notes §1.9). The test here is the one the organisers' audits use: a one-sided
Welch t-test (unequal variances) of H1: mean(reference) - mean(new) > min_gain, i.e. a Welch test
of ``reference`` against ``new + min_gain``, with Welch-Satterthwaite degrees of freedom.

Per-seed values come from run logs: the score of a run is the val_loss / val_bpb of one of its
``final_<label>_<kind>_exact`` / ``legal_ttt_exact`` lines, preferring the kinds in
:data:`SCORE_PREFERENCE` (the score-first test-time-training score when the run has one, else the
sliding window, else the round trip); with none of those, the last ``_exact`` line. Logs are the evidence a record folder ships, so the same
parser serves ``pgolf stats``, ``pgolf record`` and ``pgolf audit``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgolf.errors import UserError

SCORE_PREFERENCE = ("ttt", "sliding_window", "roundtrip")
DEFAULT_MIN_GAIN_NATS = 0.005
DEFAULT_ALPHA = 0.01

_NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
_EVAL_NAME = r"(final_\S+?|legal_ttt)"  # final_<label>_<kind> lines, and the legal TTT score
_FINAL_EXACT = re.compile(r"^" + _EVAL_NAME + r"_exact\s.*?val_loss:" + _NUM + r".*?val_bpb:" + _NUM)
_FINAL = re.compile(r"^" + _EVAL_NAME + r"\s.*?eval_time:" + _NUM + "ms")
_STEP = re.compile(r"^step:(\d+)/(\d+)\s.*?train_time:" + _NUM + "ms")
_TRAIN_LOSS = re.compile(r"^step:(\d+)/\d+ train_loss:" + _NUM)
_VAL_LOSS = re.compile(r"^step:(\d+)/\d+ val_loss:" + _NUM + r" val_bpb:" + _NUM)
_MODEL = re.compile(r"^Serialized model (\S+): (\d+) bytes")
_CODE = re.compile(r"^Code size: (\d+) bytes")
_TOTAL = re.compile(r"^Total submission size (\S+): (\d+) bytes")
_VAL_TOKENS = re.compile(r"^val_loader:.*\btokens:(\d+)")
_WITH_GPTQ = re.compile(r"\btrain_time_with_gptq:" + _NUM + "s")  # GPTQ Hessians read training data: training time


class StatsError(UserError):
    """Per-seed values that cannot be read or tested."""


@dataclass
class LogFacts:
    """What a ``log.txt`` says about its run (None / empty where it says nothing)."""

    path: str
    config: dict[str, Any] | None = None
    env: dict[str, str] = field(default_factory=dict)
    seed: int | None = None
    steps: int | None = None
    iterations: int | None = None
    train_seconds: float | None = None  # the training clock (with GPTQ calibration when logged)
    stopped_early: bool = False
    model_bytes: int | None = None
    code_bytes: int | None = None
    total_bytes: int | None = None
    val_tokens: int | None = None  # validation targets the run evaluated (val_loader line)
    finals: dict[str, tuple[float, float]] = field(default_factory=dict)  # line name -> (val_loss, val_bpb) of its _exact line
    eval_ms: dict[str, float] = field(default_factory=dict)  # line name -> eval_time ms
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float, float]] = field(default_factory=list)

    @property
    def score_name(self) -> str | None:
        for kind in SCORE_PREFERENCE:
            for name in self.finals:
                if name.endswith("_" + kind) or name == kind:
                    return name
        return next(reversed(self.finals), None)

    @property
    def score(self) -> tuple[float, float] | None:
        """(val_loss, val_bpb) of the score line."""
        name = self.score_name
        return None if name is None else self.finals[name]

    @property
    def score_line(self) -> str | None:
        """The name of the score's log line, e.g. ``final_int6_sliding_window_exact``."""
        return None if self.score_name is None else f"{self.score_name}_exact"

    @property
    def eval_seconds(self) -> float | None:
        """Sum of the final evaluations' times (every ``final_*`` / ``legal_ttt`` line with an eval_time)."""
        return sum(self.eval_ms.values()) / 1000.0 if self.eval_ms else None


def parse_log(path: str | Path) -> LogFacts:
    """Read a pgolf run log (``log.txt`` or a record's ``train_seed*.log``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StatsError(f"{path}: cannot read the log ({exc.strerror})") from None
    facts = LogFacts(str(path))
    for line in text.splitlines():
        if line.startswith("config:{") and facts.config is None:
            try:
                facts.config = json.loads(line[len("config:"):])
            except json.JSONDecodeError:
                raise StatsError(f"{path}: the config line is not valid JSON") from None
        elif line.startswith("env_") and ":" in line:
            k, _, v = line[4:].partition(":")
            facts.env[k] = v
        elif line.startswith("seed:") and line[5:].strip().lstrip("-").isdigit():
            facts.seed = int(line[5:])
        elif m := _FINAL_EXACT.match(line):
            facts.finals[m.group(1)] = (float(m.group(2)), float(m.group(3)))
        elif m := _FINAL.match(line):
            facts.eval_ms[m.group(1)] = float(m.group(2))
        elif m := _STEP.match(line):
            facts.steps, facts.iterations = int(m.group(1)), int(m.group(2))
            ms = float(m.group(3))
            facts.train_seconds = max(facts.train_seconds or 0.0, ms / 1000.0)
            if tm := _TRAIN_LOSS.match(line):
                facts.train_curve.append((int(tm.group(1)), float(tm.group(2))))
            elif vm := _VAL_LOSS.match(line):
                facts.val_curve.append((int(vm.group(1)), float(vm.group(2)), float(vm.group(3))))
        elif line.startswith("stopping_early"):
            facts.stopped_early = True
        elif m := _MODEL.match(line):
            facts.model_bytes = int(m.group(2))
        elif m := _CODE.match(line):
            facts.code_bytes = int(m.group(1))
        elif m := _TOTAL.match(line):
            facts.total_bytes = int(m.group(2))
        elif m := _VAL_TOKENS.match(line):
            facts.val_tokens = int(m.group(1))
        elif m := _WITH_GPTQ.search(line):
            facts.train_seconds = max(facts.train_seconds or 0.0, float(m.group(1)))
    if facts.seed is None and facts.config is not None:
        facts.seed = facts.config.get("train", {}).get("seed")
    return facts


# ------------------------------------------------------------------------------------------------
# samples: per-seed values from run folders, record folders or JSON files


@dataclass
class Sample:
    """Per-seed scores of one side of a comparison."""

    label: str
    val_loss: list[float]  # empty when the source only has bpb
    val_bpb: list[float]
    seeds: list[int | None]
    sources: list[str]

    @property
    def n(self) -> int:
        return len(self.val_bpb) or len(self.val_loss)


def _from_logs(label: str, logs: list[Path]) -> Sample:
    s = Sample(label, [], [], [], [])
    for log in logs:
        facts = parse_log(log)
        if facts.score is None:
            raise StatsError(f"{log}: no final_*_exact line; the run did not finish its evaluation")
        s.val_loss.append(facts.score[0])
        s.val_bpb.append(facts.score[1])
        s.seeds.append(facts.seed)
        s.sources.append(f"{log} ({facts.score_line})")
    return s


def _from_json(label: str, path: Path) -> Sample:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StatsError(f"{path}: not a readable JSON file ({exc})") from None
    if isinstance(data, dict) and "seed_results" in data:
        data = data["seed_results"]
    if isinstance(data, list) and all(isinstance(d, dict) for d in data):
        loss = [d.get("val_loss") for d in data]
        bpb = [d.get("val_bpb") for d in data]
        seeds = [d.get("seed") for d in data]
    elif isinstance(data, dict) and ("val_loss" in data or "val_bpb" in data):
        loss, bpb = data.get("val_loss") or [], data.get("val_bpb") or []
        seeds = data.get("seeds") or [None] * max(len(loss), len(bpb))
    else:
        raise StatsError(
            f"{path}: expected {{\"val_loss\": [...], \"val_bpb\": [...]}}, a list of {{\"seed\", \"val_loss\", "
            "\"val_bpb\"}} objects, or a submission.json with \"seed_results\""
        )

    def numbers(values: list, what: str) -> list[float]:
        if any(v is None for v in values):
            return []
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise StatsError(f"{path}: every {what} must be a number")
        return [float(v) for v in values]

    s = Sample(label, numbers(list(loss), "val_loss"), numbers(list(bpb), "val_bpb"), list(seeds), [str(path)])
    if not s.val_loss and not s.val_bpb:
        raise StatsError(f"{path}: no per-seed val_loss or val_bpb values")
    if s.val_loss and s.val_bpb and len(s.val_loss) != len(s.val_bpb):
        raise StatsError(f"{path}: val_loss and val_bpb lists differ in length")
    return s


def load_sample(paths: list[str | Path], label: str) -> Sample:
    """Per-seed scores from run folders (log.txt), record folders (train_seed*.log, else
    submission.json), folders of run folders (``pgolf seeds --out``) and JSON files, concatenated
    in the order given."""
    parts: list[Sample] = []
    for p in map(Path, paths):
        if p.is_dir() and (p / "log.txt").is_file():
            parts.append(_from_logs(label, [p / "log.txt"]))
        elif p.is_dir() and sorted(p.glob("train_seed*.log")):
            parts.append(_from_logs(label, sorted(p.glob("train_seed*.log"))))
        elif p.is_dir() and (p / "submission.json").is_file():
            parts.append(_from_json(label, p / "submission.json"))
        elif p.is_dir() and sorted(p.glob("*/log.txt")):  # a `pgolf seeds` output folder
            parts.append(_from_logs(label, sorted(p.glob("*/log.txt"))))
        elif p.is_file() and p.suffix == ".json":
            parts.append(_from_json(label, p))
        elif p.is_file() and p.suffix in (".log", ".txt"):
            parts.append(_from_logs(label, [p]))
        else:
            raise StatsError(f"{p}: not a run folder (log.txt), a record folder (train_seed*.log / submission.json), "
                             "a folder of run folders or a JSON file")
    has_loss = all(s.val_loss for s in parts)
    out = Sample(label, [], [], [], [])
    for s in parts:
        out.val_loss += s.val_loss if has_loss else []
        out.val_bpb += s.val_bpb
        out.seeds += s.seeds
        out.sources += s.sources
    if any(not s.val_bpb for s in parts):
        out.val_bpb = []
    return out


# ------------------------------------------------------------------------------------------------
# the test


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for a single value)."""
    n = len(values)
    assert n >= 1
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


@dataclass
class WelchResult:
    metric: str  # val_loss or val_bpb
    min_gain: float  # in the metric's unit
    n_new: int
    n_ref: int
    mean_new: float
    mean_ref: float
    sd_new: float
    sd_ref: float
    improvement: float  # mean_ref - mean_new
    se: float
    t: float
    dof: float
    p: float
    alpha: float

    @property
    def passed(self) -> bool:
        return self.p < self.alpha


def welch_improvement(new: list[float], ref: list[float], min_gain: float, *, metric: str = "val_loss",
                      alpha: float = DEFAULT_ALPHA) -> WelchResult:
    """One-sided Welch t-test of H1: mean(ref) - mean(new) > min_gain (lower is better)."""
    from scipy import stats as sps

    if len(new) < 2 or len(ref) < 2:
        raise StatsError(f"the Welch test needs at least 2 values per side (new has {len(new)}, reference {len(ref)})")
    m_new, sd_new = mean_std(new)
    m_ref, sd_ref = mean_std(ref)
    v_new, v_ref = sd_new**2 / len(new), sd_ref**2 / len(ref)
    se = math.sqrt(v_new + v_ref)
    gap = (m_ref - m_new) - min_gain
    if se == 0.0:  # identical values on both sides: the gap is certain
        t = math.inf if gap > 0 else (-math.inf if gap < 0 else math.nan)
        dof = float(len(new) + len(ref) - 2)
        p = 0.0 if gap > 0 else 1.0
    else:
        t = gap / se
        dof = (v_new + v_ref) ** 2 / (v_new**2 / (len(new) - 1) + v_ref**2 / (len(ref) - 1))
        p = float(sps.t.sf(t, dof))
    return WelchResult(metric, min_gain, len(new), len(ref), m_new, m_ref, sd_new, sd_ref, m_ref - m_new, se, t, dof, p, alpha)


def bpb_per_nat(s: Sample) -> float | None:
    """The sample's mean val_bpb / val_loss (None without both): bytes and tokens of one
    validation text under one tokenizer fix it, so it identifies how the side tokenised."""
    if not (s.val_loss and s.val_bpb) or len(s.val_loss) != len(s.val_bpb) or not all(s.val_loss):
        return None
    return sum(b / l for b, l in zip(s.val_bpb, s.val_loss)) / len(s.val_loss)


def compare(new: Sample, ref: Sample, min_gain_nats: float = DEFAULT_MIN_GAIN_NATS, alpha: float = DEFAULT_ALPHA) -> tuple[WelchResult, str]:
    """The test on val_loss (nats) when both sides have it and tokenise the validation text alike;
    otherwise on val_bpb with the nats threshold converted by a bpb/loss ratio (one validation set
    and one tokenizer give one constant: tokens per byte / ln 2). Two tokenizers (a vocabulary
    ablation) score the same text in different tokens, so nats per token do not compare and the
    test is on val_bpb with the reference's ratio. Returns the result and a note on the conversion
    ("" when none)."""
    ratio_new, ratio_ref = bpb_per_nat(new), bpb_per_nat(ref)
    # 1e-3: logs that print 4 decimals move the ratio by up to ~1e-4; two tokenizers of one size
    # trained on different text already differ by ~1% (docs/experiments.md, the vocabulary entry).
    if ratio_new and ratio_ref and not math.isclose(ratio_new, ratio_ref, rel_tol=1e-3):
        note = (f"the two sides tokenise the validation text differently (bpb/nats {ratio_new:.6f} vs {ratio_ref:.6f}): "
                f"tested on val_bpb, threshold {min_gain_nats} nats = {min_gain_nats * ratio_ref:.6f} bpb at the reference's ratio")
        return welch_improvement(new.val_bpb, ref.val_bpb, min_gain_nats * ratio_ref, metric="val_bpb", alpha=alpha), note
    if new.val_loss and ref.val_loss:
        return welch_improvement(new.val_loss, ref.val_loss, min_gain_nats, metric="val_loss", alpha=alpha), ""
    both, ratio = (new, ratio_new) if ratio_new else (ref, ratio_ref)
    if not ratio or not (new.val_bpb and ref.val_bpb):
        raise StatsError("one side has only val_bpb and neither side has both val_loss and val_bpb to convert the nats threshold")
    note = f"reference has no val_loss: threshold {min_gain_nats} nats = {min_gain_nats * ratio:.6f} bpb (bpb/nats ratio {ratio:.6f} of {both.label})"
    return welch_improvement(new.val_bpb, ref.val_bpb, min_gain_nats * ratio, metric="val_bpb", alpha=alpha), note


def format_sample(s: Sample) -> list[str]:
    rows = [f"{s.label}: n={s.n}"]
    for metric, values in (("val_loss", s.val_loss), ("val_bpb", s.val_bpb)):
        if values:
            m, sd = mean_std(values)
            rows.append(f"  {metric:<8} mean {m:.8f}  std {sd:.8f}  values {', '.join(f'{v:.8f}' for v in values)}")
    rows.append(f"  seeds {', '.join('?' if x is None else str(x) for x in s.seeds)}")
    return rows


def format_result(r: WelchResult, note: str = "") -> list[str]:
    unit = "nats" if r.metric == "val_loss" else "bpb"
    verdict = "PASS" if r.passed else "FAIL"
    rows = [
        f"H1: mean(reference) - mean(new) > {r.min_gain:.6g} {unit} ({r.metric}), one-sided Welch t-test",
        f"  improvement {r.improvement:.8f} {unit} = {r.mean_ref:.8f} - {r.mean_new:.8f}; se {r.se:.3e}",
        f"  t = {r.t:.4f}, dof = {r.dof:.3f}, p = {r.p:.3e}",
        f"  {verdict}: p {'<' if r.passed else '>='} {r.alpha}",
    ]
    return ([f"  note: {note}"] if note else []) + rows
