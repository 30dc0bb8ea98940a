"""`tccp info`: parameters and FLOPs of a pack's two networks (or of a named stage-2 config).

Stage 1 (the landmark network) runs once per window with the regression objective
(`steps` times with diffusion); stage 2's per-window FLOPs multiply by its sampler
steps and by 2 with classifier-free guidance (the unconditional half doubles the
batch). The autoencoder and the Whisper encoder are not counted (see `tccp bench`).
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", default="mouth", help="named stage-2 config: paper, small, mouth, tiny (default: mouth)")
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


def _measure_stage1(cfg) -> dict:  # noqa: ANN001
    """Parameters and FLOPs of the stage-1 landmark network for one window."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tccp.models.landmarks import LandmarkNet

    torch.manual_seed(0)
    net = LandmarkNet(cfg).eval()
    n = cfg.frames
    audio = torch.zeros(1, n, cfg.audio_tokens, cfg.audio_layers * cfg.audio_width)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        ctx = net.condition_tokens(audio, torch.zeros(1, n), torch.zeros(1, 4, cfg.ref_dim))
        net(torch.zeros(1, n, cfg.gen_dim), torch.zeros(1, dtype=torch.long), ctx, torch.zeros(1, n, cfg.cv_dim),
            torch.zeros(1, n))
    return {"params": sum(p.numel() for p in net.parameters()), "flops_window": int(counter.get_total_flops())}


def main(args: argparse.Namespace) -> int:
    from tccp.errors import TCCPError
    from tccp.models.config import get_config

    stage1 = head = None
    if args.pack:
        from tccp.models.config import MVConfig
        from tccp.models.landmarks import LandmarkNetConfig
        from tccp.pack import read_pack_config

        pc = read_pack_config(args.pack)
        stage1 = LandmarkNetConfig.from_dict(pc["stage1"]["model"])
        if isinstance(pc.get("stage1_head"), dict):
            head = LandmarkNetConfig.from_dict(pc["stage1_head"]["model"])
        c2 = pc.get("stage2") or None
        cfg2 = MVConfig.from_dict(c2["model"]) if c2 else None
        steps = args.steps if args.steps is not None else int((c2 or {}).get("sampler", {}).get("steps", 4))
        scale = args.cfg_scale if args.cfg_scale is not None else float((c2 or {}).get("sampler", {}).get("cfg_scale", 1.0))
        s1_calls = 1 if stage1.objective == "regress" else int(pc["stage1"].get("steps", 4))
        name = str(args.pack)
    else:
        cfg2 = get_config(args.config)
        steps = args.steps if args.steps is not None else 4
        scale = 1.0 if args.cfg_scale is None else args.cfg_scale
        s1_calls = 0
        name = args.config
    if steps < 0:
        raise TCCPError("--steps must be >= 0")
    mult = steps * (2 if scale != 1.0 else 1)
    report: dict = {"config": name, "steps": steps, "cfg_scale": scale}
    window = 0
    total = 0
    if stage1 is not None:
        m1 = _measure_stage1(stage1)
        report["stage1"] = {**m1, "calls_per_window": s1_calls, "objective": stage1.objective}
        report["stage1_params"] = m1["params"]
        window += m1["flops_window"] * s1_calls
        total += m1["params"]
    if head is not None:  # the head region's stage 1 (used instead of stage 1, not counted in the window)
        report["stage1_head"] = _measure_stage1(head)
    if cfg2 is not None:
        m2 = _measure(cfg2)
        report["stage2"] = m2
        report["stage2_params"] = m2["params"]["total"]
        window += m2["flops_window"] * mult
        total += m2["params"]["total"]
        report["first_frame_flops"] = m2["flops_first"] * mult
    report["total_params"] = total
    report["fp16_megabytes"] = total * 2 / 1e6
    report["window_flops"] = window
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model: {name}   stage-2 sampler steps: {steps}   cfg scale: {scale:g}")
    if stage1 is not None:
        s = report["stage1"]
        print(f"  stage1 (landmarks, {s['objective']}): params {s['params'] / 1e6:.2f} M, "
              f"{s['flops_window'] / 1e6:.1f} MFLOPs per 8-frame call, {s['calls_per_window']} call(s) per window")
    if head is not None:
        s = report["stage1_head"]
        print(f"  stage1_head (--region head): params {s['params'] / 1e6:.2f} M, "
              f"{s['flops_window'] / 1e6:.1f} MFLOPs per 8-frame call (instead of stage1)")
    if cfg2 is not None:
        s = report["stage2"]
        p = s["params"]
        print(f"  stage2 (faces): params {p['total'] / 1e6:.2f} M (diffusion {p['diffusion'] / 1e6:.2f} M, control "
              f"{p['control'] / 1e6:.2f} M, conditions {p['conditions'] / 1e6:.2f} M)")
        print(f"          one call: {s['flops_window'] / 1e9:.2f} GFLOPs per {s['frames']}-frame window, "
              f"{s['flops_first'] / 1e9:.3f} GFLOPs first frame (N=1)")
    print(f"  per window: {window / 1e9:.2f} GFLOPs of network work; fp16 weights {report['fp16_megabytes']:.1f} MB")
    return 0
