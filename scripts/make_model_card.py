"""Write the bundled pack's MODEL_CARD.md from its training runs and a `tccp eval --suite` result.

Why a script and not hand-written prose: every number in the card comes from files
this script reads (the runs' logs and the suite's JSON), so the card can be
regenerated after any retraining:

    tccp eval --suite --json out/suite.json --work out/suite
    python scripts/make_model_card.py --stage1 runs/s1 --stage2 runs/s2 \
        --pack tccp/assets/models/default --suite-json out/suite.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import time
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def stage1_info(run: Path) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    rows = _rows(run / "metrics.jsonl")
    val = _rows(run / "val.jsonl")
    # `t` restarts at 0 in each resumed chunk: add up the chunks
    total, last = 0.0, 0.0
    for r in rows:
        if r["t"] < last:
            total += last
        last = r["t"]
    total += last
    return {"steps": rows[-1]["step"] if rows else 0, "minutes": total / 60,
            "loss": rows[-1].get("loss_smooth") if rows else None, "val": val[-1] if val else None, "config": cfg}


def stage2_info(run: Path | None, upto: int | None = None) -> dict | None:
    if run is None:
        return None
    cfg = json.loads((run / "config.json").read_text())
    rows = [r for r in _rows(run / "metrics.jsonl") if upto is None or r.get("step", 0) <= upto]
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    secs = sum(r.get("sec_per_step", 0.0) * 10 for r in train)
    return {"steps": train[-1]["step"] if train else 0, "minutes": secs / 60, "loss": train[-1]["loss"] if train else None,
            "val": val[-1] if val else None, "config": cfg}


def fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)



def suite_section(suite: dict) -> list[str]:
    """The card's end-to-end section (heading to the blank line before "## Limits")."""
    from tccp.metrics.suite import format_table

    clips = ", ".join(sorted(suite["clips"]))
    overlap = [k for k, c in suite["clips"].items() if c.get("bank_overlap")]
    adapted = [k for k, c in suite["clips"].items() if ((c.get("run_stats") or {}).get("adapt") or {}).get("adapted")]
    notes = [c["run_stats"]["adapt"].get("note", "") for k, c in suite["clips"].items() if k in adapted]
    steps = sorted({m.group(1) for m in (re.search(r"(\d+) steps", n) for n in notes) if m})  # as the runs said
    return [
        "## End to end (`tccp eval --suite`, reconstruction, same run, same codec)",
        f"Clips: {clips}; {suite['seconds']:g} s each; the reference bank comes from the clip's frames after the "
        "evaluated seconds" + (f" (from the whole clip for {', '.join(overlap)}, too short)" if overlap else "") + "."
        + (f" Stage 1 is adapted to the person (`engine.adapt`, {'/'.join(steps) or '?'} steps) on up to 15 s after the evaluated "
           f"seconds for {', '.join(sorted(adapted))}; the other clips have too little after them and run the "
           "pack's stage 1 (their `unadapted` row is the same run)." if adapted else ""),
        "",
        "```",
        format_table(suite),
        "```",
        "",
        "Clips with speech only:",
        "```",
        format_table(suite, key="summary_speech", stage1=False),
        "```",
        "",
        "Rows: tccp = the pack as shipped (landmarks from the audio, stage 1 adapted to the person where the clip",
        "allows); unadapted = the same without the adaptation; tccp_tracked = stage 2 on the clip's",
        "tracked landmarks; warp = the warped reference alone; denoiser = the learned correction at 4 DDIM",
        "steps, half its change added to the warp (`engine.runner.CORRECTION_GAIN`); frozen = the first",
        "frame's mouth; blur = the real mouth blurred (sigma 2.5 px); real = the",
        "codec round trip. Stage-1 table: tccp = the pack's stage 1, adapted = as shipped (adapted where the",
        "run adapted), elsewhere = as shipped with the rest of the face from elsewhere in the clip (its meshes",
        "played backwards: a dub's situation, where the source face moves with other speech; absent in suites",
        "run before it was measured).",
        "Columns: mouth r = aperture correlation with the real mouth; PSNR mouth / sharp = PSNR and Laplacian-",
        "variance ratio in the mouth box (lips x 1.8) at source resolution; PSNR kept = the face outside the",
        "regenerated region; identity = dlib face-embedding cosine to the real frames.",
        "Since the source-skin change (docs/faces.md, \"The skin stays the source's\") the region's skin away from",
        "the lips is the source frame warped onto the target landmarks; in reconstruction that frame is the real",
        "one, so part of every mouth-box PSNR is the real skin, and on tracked landmarks (an identity warp) all of",
        "the skin is: tccp_tracked then bounds the lips and the mouth's inside, not the whole region.",
        "",
    ]


def stage1_section(v: dict, when: str) -> list[str]:
    """The card's stage-1 table from validation summaries per feature view
    (`tccp.training.landmarks.validate`: {"full": ..., "stream0": ..., "stream2": ...})."""
    vf, vs0, vs2 = v.get("full", {}), v.get("stream0", {}), v.get("stream2", {})

    def row(name: str, m: dict) -> str:
        return (f"| {name} | {fmt(m.get('aperture_corr'))} | {fmt(m.get('lip_lmd'), '.4f')} | "
                f"{fmt(m.get('abs_lag'), '.2f')} | {fmt(m.get('silence_ratio'))} |")

    return [
        f"## Stage 1 on the held-out clips with speech (reconstruction, {when})",
        "| features | mouth-aperture r | LipLMD | |lag| (frames) | silence ratio |",
        "| --- | --- | --- | --- | --- |",
        row("full context (files)", vf), row("live, no look-ahead", vs0), row("live, 0.2 s look-ahead", vs2),
        f"| baseline: mean lips held | - | {fmt(vf.get('baseline_mean_lips_lmd'), '.4f')} | - | - |",
        "",
    ]


HEAD_TABLE = ("| mouth-aperture r | LipLMD (mean lips) | sketch LMD (hold) | pose angle RMS deg (hold) | "
              "head position RMS, crop fraction (hold) | head-motion ratio |", "| --- | --- | --- | --- | --- | --- |")
HEAD_SUITE = "End to end, `tccp eval --suite --region head`"


def head_row(hv: dict) -> str:
    """The card's head-mode stage-1 row from a validation summary (full-context features)."""
    return (f"| {fmt(hv.get('aperture_corr'))} | {fmt(hv.get('lip_lmd'), '.4f')} "
            f"({fmt(hv.get('baseline_mean_lips_lmd'), '.4f')}) | {fmt(hv.get('sketch_lmd'), '.4f')} "
            f"({fmt(hv.get('baseline_hold_sketch_lmd'), '.4f')}) | {fmt(hv.get('pose_angle_deg'), '.2f')} "
            f"({fmt(hv.get('baseline_hold_pose_angle_deg'), '.2f')}) | {fmt(hv.get('pose_origin'), '.4f')} "
            f"({fmt(hv.get('baseline_hold_pose_origin'), '.4f')}) | {fmt(hv.get('pose_motion_ratio'), '.2f')} |")


def head_suite_block(hs: dict) -> list[str]:
    from tccp.metrics.suite import format_table

    return [
        HEAD_SUITE + " (same clips and seconds; frozen, blur and real as above;",
        "PSNR kept is the face outside the *mouth* region, which head mode edits too; head mode does not adapt",
        "stage 1 to the person, so its `unadapted` row, where shown, is the same run):",
        "```",
        format_table(hs, stage1=False),
        "```",
    ]


def update_head_suite(pack: Path, suite_json: Path) -> Path:
    """Replace only the head-mode end-to-end block (at the end of the card)."""
    card = pack / "MODEL_CARD.md"
    head, _ = card.read_text().split(HEAD_SUITE, 1)
    card.write_text(head + "\n".join(head_suite_block(json.loads(suite_json.read_text()))) + "\n")
    return card


def update_stage1(pack: Path, data: Path) -> Path:
    """Validate the pack's stage 1 as the engine runs it today (its voice-activity gate
    included) on the held-out clips of `data` and replace only the card's stage-1 table:
    a change of the gate changes these numbers without any retraining."""
    from tccp.data.datasets import find_prepared, split_clips
    from tccp.data.landmarks import load_landmark_clips
    from tccp.pack import load_stage1
    from tccp.training.landmarks import validate

    net, codec = load_stage1(pack)
    _, val = split_clips(find_prepared(str(data)))
    clips = load_landmark_clips(val, codec.template, kinds=("full", "stream0", "stream2"),
                                cache_dir=str(data / ".cache-whisper"))
    v = {kind: validate(net, codec, clips, kind=kind)["summary"] for kind in ("full", "stream0", "stream2")}
    card = pack / "MODEL_CARD.md"
    text = card.read_text()
    head, rest = text.split("## Stage 1 on the held-out clips", 1)
    _, tail = rest.split("## End to end", 1)
    when = f"the pack as the engine runs it on {time.strftime('%Y-%m-%d')}, `--update-stage1`"
    text = head + "\n".join(stage1_section(v, when)) + "\n## End to end" + tail
    if (pack / "stage1_head.safetensors").is_file() and HEAD_TABLE[1] in text:
        hnet, hcodec = load_stage1(pack, key="stage1_head")
        hclips = load_landmark_clips(val, hcodec.template, kinds=("full",), cache_dir=str(data / ".cache-whisper"),
                                     context=True)
        hv = validate(hnet, hcodec, hclips, kind="full")["summary"]
        before, after = text.split(HEAD_TABLE[1] + "\n", 1)
        text = before + HEAD_TABLE[1] + "\n" + head_row(hv) + "\n" + after.split("\n", 1)[1]
    card.write_text(text)
    return card


def update_suite(pack: Path, suite_json: Path) -> Path:
    """Replace only the end-to-end section of an existing card (the training runs it was
    written from need not exist any more)."""
    card = pack / "MODEL_CARD.md"
    text = card.read_text()
    head, rest = text.split("## End to end", 1)
    _, tail = rest.split("## Limits", 1)
    suite = json.loads(suite_json.read_text())
    note = (f"(End-to-end section updated on {time.strftime('%Y-%m-%d')} by `scripts/make_model_card.py "
            f"--update-suite` from a new suite run; the rest as written from the training runs.)\n\n")
    card.write_text(head + "\n".join(suite_section(suite)) + "\n" + note + "## Limits" + tail)
    return card


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage1", type=Path, default=None)
    ap.add_argument("--stage2", type=Path, default=None, help="omit for a warp-only pack")
    ap.add_argument("--pack", type=Path, required=True)
    ap.add_argument("--suite-json", type=Path, default=None, help="a finished `tccp eval --suite --json` result")
    ap.add_argument("--update-suite", type=Path, default=None, metavar="SUITE_JSON",
                    help="only replace the end-to-end section of the pack's existing card with this suite result")
    ap.add_argument("--update-stage1", type=Path, default=None, metavar="PREPARED",
                    help="only replace the stage-1 table of the pack's card with a validation of the pack as the "
                         "engine runs it now, on the held-out clips of this prepared folder")
    ap.add_argument("--update-head-suite", type=Path, default=None, metavar="SUITE_JSON",
                    help="only replace the head-mode end-to-end block of the card with this `--region head` result")
    ap.add_argument("--stage1-head", type=Path, default=None, help="the head-mode stage-1 run (when the pack has one)")
    ap.add_argument("--head-suite-json", type=Path, default=None, help="`tccp eval --suite --region head` result")
    ap.add_argument("--machine", default=f"{platform.machine()}, 2 CPU cores shared with other jobs, no GPU")
    args = ap.parse_args()
    if args.update_stage1 is not None:
        print(update_stage1(args.pack, args.update_stage1))
    if args.update_suite is not None:
        print(update_suite(args.pack, args.update_suite))
    if args.update_head_suite is not None:
        print(update_head_suite(args.pack, args.update_head_suite))
    if args.update_stage1 is not None or args.update_suite is not None or args.update_head_suite is not None:
        return 0
    if args.stage1 is None or args.suite_json is None:
        ap.error("--stage1 and --suite-json are required (or --update-stage1 / --update-suite / --update-head-suite)")

    pack_cfg = json.loads((args.pack / "config.json").read_text())
    packed = ((pack_cfg.get("card") or {}).get("training") or {}).get("stage2") or {}
    s1, s2 = stage1_info(args.stage1), stage2_info(args.stage2, packed.get("step"))
    steps = int(((pack_cfg.get("stage2") or {}).get("sampler") or {}).get("steps", 0)) if s2 else 0
    suite = json.loads(args.suite_json.read_text())
    for name, run in (("stage1", args.stage1), ("stage2", args.stage2)):
        if run is not None and (run / "loss.png").is_file():
            shutil.copyfile(run / "loss.png", args.pack / f"loss_{name}.png")
    m1 = s1["config"]["model"]
    v = (s1["val"] or {})
    lines = [
        "# Model card: the bundled pack (`tccp/assets/models/default`)",
        "",
        f"Written by `scripts/make_model_card.py` on {time.strftime('%Y-%m-%d')} from the training runs and a",
        "`tccp eval --suite` run; every number below comes from those files.",
        "",
        "## What it is",
        "- **Stage 1** (`tccp.models.landmarks.LandmarkNet`, "
        f"objective `{m1['objective']}`, width {m1['width']}, depth {m1['depth']}): "
        f"lip and jaw coordinates in the head frame from Whisper {m1.get('audio_encoder', 'tiny.en')} audio tokens "
        "(all layers, +-2 frames), "
        "voice activity and the person's reference lip shapes, with the source's tracked upper face as the "
        "control input (mouth mode). Articulation gain on the generated lip opening: "
        f"{float((pack_cfg.get('stage1') or {}).get('articulation', 1.0)):g} (undoes the regressor's damping; "
        "docs/lipsync.md, \"Amplitude\"; `--mouth-scale` multiplies it).",
        "- **Stage 2**: the best-matching reference frame of the person's bank, warped onto the target "
        "landmarks" + (", plus a learned correction: the mouth-patch MVControlNet (`mouth` config: 80 px patch of "
                       "the 128 px crop, 10 x 10 TAEF2 latents, masked source + warped reference + region mask as extra "
                       "input channels, sketch through the control branch, generating the correction to the warp). "
                       f"Default stage-2 steps: {steps}" + (" (the warp alone: the correction, added at half strength, "
                                                             "measures a little better, see the `denoiser` row, at about a "
                                                             "fifth of the speed; `--steps 4` uses it)"
                                                             if steps == 0 else "") + "."
                       if s2 else " (a warp-only pack)."),
        "- Reference bank: 8 typical lip shapes from closed to open (`engine.refs.select_references`).",
        "- Compositing pastes only the lower face, at source resolution, with the reference's high frequencies.",
        "",
        "## How it was trained",
        f"Machine: {args.machine}.",
        f"- Stage 1: {s1['steps']} steps in {s1['minutes']:.0f} min of training (chunks resumed) from scratch on "
        f"{len(s1['config'].get('train_clips', []))} lip-sync clips of `../shared/data/clips` (clips without speech, "
        "music and still faces are excluded by voice activity and mouth motion), batch 32 windows of 8 frames, "
        "AdamW 3e-4, EMA 0.999; Whisper feature variants full / live (0 and 0.2 s look-ahead) / noisy / silenced, "
        "mirror and pose-jitter augmentation.",
    ]
    if s2:
        lines.append(f"- Stage 2: {s2['steps']} steps (~{s2['minutes']:.0f} CPU-min of step time) on the mouth-patch "
                     f"latent cache of {len(s2['config'].get('train_clips', []))} clips (first 300 frames each), batch "
                     f"{s2['config']['train']['batch']}, v-prediction, AdamW {s2['config']['train']['lr']}, "
                     f"EMA {s2['config']['train']['ema_decay']}; final loss {fmt(s2['loss'])}.")
    lines += [
        f"- Held out, never trained on: {', '.join(s1['config'].get('val_clips', []))}.",
        "",
        *stage1_section(v, "at the end of training"),
        *suite_section(suite),
        "## Limits",
        "- Trained on about 15 minutes of public footage on a CPU: it has seen few people and few mouths.",
        "- The mouth interior comes from the person's own reference frames; teeth or a tongue no reference shows",
        "  cannot appear.",
    ]
    if args.stage1_head is not None:
        h = stage1_info(args.stage1_head)
        hv = (h["val"] or {}).get("full", {})
        lines += [
            "- Head mode (`--region head`) has no stage-2 network: the whole head is the warped reference.",
            "",
            "## Head mode (`--region head`, the paper's setting)",
            f"- Stage 1 head (`stage1_head.safetensors`): the same network family generating all 160 sketch points "
            f"and 4 head-pose values from the same audio tokens, with the head-masked context crop pooled to 8 x 8 "
            f"as the control input; {h['steps']} steps in {h['minutes']:.0f} min from scratch, same clips and recipe.",
            "- Stage 2 head: the best reference aligned on the skull points and warped onto the generated head "
            "(`tccp.pipelines.heads`), pasted under the head region. No network.",
            "",
            "Stage 1 head on the held-out clips (full-context features; hold = the references' mean shape and pose "
            "held still):",
            "",
            *HEAD_TABLE, head_row(hv),
        ]
    else:
        lines.append("- Head mode (whole-head replacement, the paper's setting) is not trained in this pack.")
    if args.head_suite_json is not None:
        hs = json.loads(args.head_suite_json.read_text())
        lines += ["", *head_suite_block(hs)]
    (args.pack / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
    print(args.pack / "MODEL_CARD.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
