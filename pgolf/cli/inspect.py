"""``pgolf inspect``: what a preset builds (parameter counts by group) or what an artifact holds."""

from __future__ import annotations

import argparse

from pgolf.cli.common import add_config_args, config_from_args, print_json


def estimate_code_bytes() -> int:
    """The code a run would count: the pgolf modules that training, export and evaluation load."""
    import pgolf.eval.suite  # noqa: F401  (loaded by every run)
    import pgolf.train.run  # noqa: F401
    from pgolf.train.codesize import package_code_bytes

    return package_code_bytes()


def register(sub) -> None:
    p = sub.add_parser("inspect", help="parameter counts of a preset, or the contents of an artifact")
    add_config_args(p)
    p.add_argument("--artifact", default=None, help="inspect this artifact file instead of a preset")
    p.add_argument("--list", action="store_true", help="list presets and profiles")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--codecs", choices=("all", "fast", "none"), default="all",
                   help="with --artifact: compare pgolf's bytes with zstd-22, byte-shuffled brotli-11 and (all, when the lrzip "
                        "binary is installed) R7's per-group lrzip scheme on the same integers (default all; fast skips lrzip)")
    p.set_defaults(func=run)


def preset_report(args: argparse.Namespace) -> dict:
    from pgolf.config import diff_from_defaults, preset_meta
    from pgolf.model.gpt import build_model, count_parameters
    from pgolf.optim.groups import split_parameters
    from pgolf.quant.predict import predict_artifact_bytes

    cfg = config_from_args(args)
    model = build_model(cfg.model, "cpu")
    counts = count_parameters(model)
    groups = split_parameters(model)
    meta = preset_meta(cfg.preset)
    return {
        "preset": cfg.preset,
        "profile": cfg.profile,
        "description": meta.get("description", ""),
        "params": counts["total"],
        "expected_params": meta.get("expected_params"),
        "params_by_group": {k: v for k, v in counts.items() if k != "total"},
        "optimizer_groups": {k: {"tensors": len(v), "params": sum(p.numel() for _, p in v)} for k, v in groups.__dict__.items()},
        "config_changes": diff_from_defaults(cfg),
        "predicted_artifact": predict_artifact_bytes(cfg, estimate_code_bytes()),
        # The step-time model (pgolf.train.steptime): only for the 8xH100 profile it is calibrated on.
        "plan_8xh100": _plan(cfg) if cfg.profile == "8xh100" else None,
    }


def _plan(cfg) -> dict:
    from pgolf.train.steptime import predict_run

    return predict_run(cfg)


def format_plan(plan: dict) -> list[str]:
    """The 8xH100 plan's lines of the text report."""
    ms = f"{plan['ms_per_step_loops_off']:.1f} ms/step"
    if plan["ms_per_step_loops_on"] is not None:
        on = plan["loop_on_step"]
        ms = (f"{plan['ms_per_step_loops_off']:.1f} ms/step loops off, {plan['ms_per_step_loops_on']:.1f} with loops on"
              + (f" (from step {on:,})" if on is not None else " (never reached)"))
    reserve = "" if not plan["reserve_seconds"] else f" ({plan['reserve_seconds']:g} s reserved for GPTQ)"
    ser = plan["serialisation"]
    lines = [
        f"8xH100 plan (step-time model, {plan['assumption']}):",
        f"  training     {ms}; mean {plan['ms_per_step_mean']:.1f} ms -> {plan['steps']:,} steps in "
        f"{plan['train_seconds']:.1f} s{reserve}, {plan['tokens_per_second'] / 1e6:.2f} M tok/s",
        f"  serialise    {ser['total_seconds']:.1f} s (GPTQ Hessians {ser['gptq_hessian_seconds']:.1f} s, solve "
        f"{ser['gptq_solve_seconds']:.1f} s, compress {ser['compress_seconds']:.1f} s)",
    ]
    ev = plan.get("eval")
    if ev:
        parts = [f"standard {ev['standard_seconds']:.1f} s"]
        if ev["sliding_seconds"] is not None:
            parts.append(f"sliding {ev['sliding_seconds']:.1f} s")
        if ev["ttt_seconds"] is not None:
            parts.append(f"TTT {ev['ttt_seconds']:.1f} s")
        lines.append(f"  evaluate     {ev['total_seconds']:.1f} s of {ev['limit_seconds']:.0f} s ({', '.join(parts)}; "
                     f"{'fits' if ev['fits'] else 'OVER THE LIMIT'})")
    return lines


def run(args: argparse.Namespace) -> int:
    from pgolf.config import list_presets, list_profiles

    if args.list:
        out = {"presets": list_presets(), "profiles": list_profiles()}
        if args.json:
            print_json(out)
        else:
            print("presets: " + ", ".join(out["presets"]))
            print("profiles: " + ", ".join(out["profiles"]))
        return 0
    if args.artifact:
        from pgolf.quant.report import artifact_report, format_artifact_report

        rep = artifact_report(args.artifact, codecs=args.codecs)
        print_json(rep) if args.json else print(format_artifact_report(rep))
        return 0
    rep = preset_report(args)
    if args.json:
        print_json(rep)
        return 0
    print(f"preset {rep['preset']} (profile {rep['profile']}): {rep['description']}")
    print(f"params: {rep['params']:,}" + (f" (expected {rep['expected_params']:,})" if rep["expected_params"] and rep["profile"] == "none" else ""))
    for k, v in rep["params_by_group"].items():
        print(f"  {k:<16} {v:>12,}")
    print("optimizer groups:")
    for k, v in rep["optimizer_groups"].items():
        print(f"  {k:<16} {v['tensors']:>4} tensors {v['params']:>12,} params")
    pred = rep["predicted_artifact"]
    print(f"predicted artifact (upper): model {pred['model_bytes']:,} B + code {pred['code_bytes']:,} B = {pred['artifact_bytes']:,} B of "
          f"{pred['budget_bytes']:,} B ({'fits' if pred['fits_upper'] else 'over budget'}; {pred['method']})")
    if pred["calibration"]:
        print(f"predicted artifact (calibrated x{pred['calibration']['factor']:.3f} on {pred['calibration']['source']}): "
              f"{pred['artifact_bytes_calibrated']:,} B ({'fits' if pred['fits'] else 'OVER BUDGET'})")
    for fmt, v in pred["by_format"].items():
        print(f"  {fmt:<16} {v['params']:>12,} params {v['bits_per_weight']:>6.3f} bits/weight {v['bytes']:>12,} B")
    if rep["plan_8xh100"]:
        print("\n".join(format_plan(rep["plan_8xh100"])))
    return 0
