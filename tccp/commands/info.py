"""`tccp info`: parameters and FLOPs of a model config (or of a pack's configs).

Both stages share one architecture, so one model is measured per stage; the per-window
totals multiply by the sampler steps, by 2 with classifier-free guidance (the
unconditional half doubles the batch) and by the two stages.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", default="small", help="named model config: paper, small, tiny (default: small)")
    src.add_argument("--pack", metavar="DIR", help="read the stage configs and sampler settings from a model pack")
    p.add_argument("--steps", type=int, default=None, help="sampler steps per window (default: pack's, else 10)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance scale; != 1 doubles the work (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _measure(cfg) -> dict:  # noqa: ANN001
    """Parameters and FLOPs of one stage, counted on the meta device: shapes only, no
    weights initialised and no arithmetic done, so `paper` takes ~2 s instead of a real
    forward pass per count (26 s for `small` on a busy 2-core machine). Attention is
    counted too (on CPU tensors torch's counter has no formula for its fused kernel)."""
    import torch

    from tccp.models.mvcontrolnet import MVControlNet, count_flops, count_params

    try:
        with torch.device("meta"):
            model = MVControlNet(cfg)
    except (NotImplementedError, RuntimeError):  # pragma: no cover - an op without a meta kernel
        torch.manual_seed(0)
        model = MVControlNet(cfg)
    with torch.no_grad():
        return {
            "params": count_params(model),
            "flops_window": count_flops(model, cfg, frames=cfg.frames),
            "flops_first": count_flops(model, cfg, frames=1),
            "frames": cfg.frames,
        }


def main(args: argparse.Namespace) -> int:
    from tccp.errors import TCCPError
    from tccp.models.config import get_config

    if args.pack:
        from tccp.models.config import MVConfig
        from tccp.pack import read_pack_config

        pc = read_pack_config(args.pack)
        cfgs = {"stage1": MVConfig.from_dict(pc["stage1"]), "stage2": MVConfig.from_dict(pc["stage2"])}
        steps = args.steps or int(pc.get("sampler", {}).get("steps", 10))
        scale = args.cfg_scale if args.cfg_scale is not None else float(pc.get("sampler", {}).get("cfg_scale", 1.0))
        name = str(args.pack)
    else:
        cfg = get_config(args.config)
        cfgs = {"stage1": cfg, "stage2": cfg}
        steps = args.steps or 10
        scale = 1.0 if args.cfg_scale is None else args.cfg_scale
        name = args.config
    if steps < 1:
        raise TCCPError("--steps must be >= 1")
    mult = steps * (2 if scale != 1.0 else 1)
    measured: dict[str, dict] = {}  # both stages usually share one config: measure it once
    stages = {}
    for k, c in cfgs.items():
        key = json.dumps(c.to_dict(), sort_keys=True, default=str)
        if key not in measured:
            measured[key] = _measure(c)
        stages[k] = measured[key]
    total_params = sum(s["params"]["total"] for s in stages.values())
    report = {
        "config": name,
        "steps": steps,
        "cfg_scale": scale,
        "stages": stages,
        "total_params": total_params,
        "fp16_megabytes": total_params * 2 / 1e6,
        "window_flops": sum(s["flops_window"] for s in stages.values()) * mult,
        "first_frame_flops": sum(s["flops_first"] for s in stages.values()) * mult,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model: {name}   sampler steps: {steps}   cfg scale: {scale:g}")
    for key, s in stages.items():
        p = s["params"]
        print(
            f"  {key}: params {p['total'] / 1e6:.2f} M (diffusion {p['diffusion'] / 1e6:.2f} M, control "
            f"{p['control'] / 1e6:.2f} M, conditions {p['conditions'] / 1e6:.2f} M)"
        )
        print(
            f"          one call: {s['flops_window'] / 1e9:.2f} GFLOPs per {s['frames']}-frame window, "
            f"{s['flops_first'] / 1e9:.3f} GFLOPs first frame (N=1)"
        )
    new = max(1, stages["stage1"]["frames"] - 1)
    print(f"  both stages: {total_params / 1e6:.2f} M params, {report['fp16_megabytes']:.1f} MB in fp16")
    print(
        f"  per window ({new} new frames, both stages x {steps} steps"
        f"{' x 2 (CFG)' if scale != 1.0 else ''}): {report['window_flops'] / 1e9:.1f} GFLOPs "
        f"({report['window_flops'] / new / 1e9:.1f} GFLOPs per new frame)"
    )
    print(f"  first frame: {report['first_frame_flops'] / 1e9:.2f} GFLOPs")
    return 0
