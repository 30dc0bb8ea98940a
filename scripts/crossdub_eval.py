"""Real dubs, judged independently: each held-out clip's video dubbed with another
held-out clip's speech by `tccp run` (its defaults, adaptation included), the output's
mouth judged by the shared checker (`../shared/tools/mouth_sync.py`) against the real
mouth of the clip whose speech it is. The reconstruction suite (`tccp eval --suite`)
cannot see what a dub changes: there the face moves with the very speech it is given.

    python scripts/crossdub_eval.py --pack default=tccp/assets/models/default \\
        --pack ctrl=/tmp/pack_ctrl --work /tmp/xdub --json out/crossdub.json --plot out/crossdub.png

Baseline in the same run: `source`, the video left alone (its own mouth against the
speech's real mouth: what "worse than leaving the video alone" means for a dub). Videos
already in --work are reused (a rerun only judges again). One line per result as it goes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CLIPS = SHARED / "data" / "clips"
CHECKER = SHARED / "tools" / "mouth_sync.py"
VIDEOS = ("vr_face5", "lp_d20", "vx_vasa_17", "vx_emo_yomir", "sadtalker_WDA_EdMarkey0_000", "lipnet_swiz3n",
          "edtalk_mouth_source_noaudio", "latentsync_demo3_video")
# speech sources: the held-out clips whose real mouth can judge their speech (lp_d20's video
# runs ~6 frames off its audio, vx_emo_yomir's mouth hardly moves: docs/lipsync.md)
SPEECH = ("vr_face5", "vx_vasa_17", "sadtalker_WDA_EdMarkey0_000", "lipnet_swiz3n", "edtalk_mouth_source_noaudio",
          "latentsync_demo3_video")


def default_pairs(per_video: int = 2) -> list[tuple[str, str]]:
    """Each held-out video with `per_video` other clips' speech, cycling through SPEECH."""
    pairs: list[tuple[str, str]] = []
    for i, a in enumerate(VIDEOS):
        j, k = i, 0
        while k < per_video:
            b = SPEECH[j % len(SPEECH)]
            j += 1
            if b != a and (a, b) not in pairs:
                pairs.append((a, b))
                k += 1
    return pairs


def clip_file(name: str) -> Path:
    for ext in (".mp4", ".mpg"):
        if (CLIPS / f"{name}{ext}").is_file():
            return CLIPS / f"{name}{ext}"
    raise SystemExit(f"{name}: no such clip in {CLIPS}")


def speech_file(name: str) -> Path:
    """The clip's speech: its own track, or the same-stem .wav of an `x_noaudio` video
    (`tccp prepare`'s rule, `tccp.data.prepare.resolve_audio`)."""
    from tccp.data.prepare import resolve_audio
    from tccp.media.io import probe

    video = clip_file(name)
    return resolve_audio(video, None, probe(video).has_audio) or video


def judge(real: Path, video: Path, audio: Path | None = None) -> dict:
    extra = ["--audio", str(audio)] if audio is not None and audio.suffix == ".wav" else []
    out = subprocess.run([sys.executable, str(CHECKER), str(real), str(video), *extra], capture_output=True, text=True)
    lines = [x for x in out.stdout.splitlines() if x.strip().startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr.strip().splitlines() or ["checker failed"])[-1]}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", action="append", required=True, metavar="NAME=PATH", help="a pack to dub with (repeat)")
    ap.add_argument("--pairs", metavar="FILE", help="lines 'VIDEO SPEECH' (clip names); default: default_pairs()")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--work", required=True, help="folder for the dubbed videos (reused when present)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--plot")
    args = ap.parse_args(argv)
    if not CHECKER.is_file():
        raise SystemExit(f"{CHECKER}: the shared checker is missing (needs ../shared beside the repository)")
    packs = dict(p.split("=", 1) for p in args.pack)
    pairs = ([tuple(x.split()) for x in Path(args.pairs).read_text().splitlines() if x.strip()] if args.pairs
             else default_pairs())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tccp = str(Path(sys.executable).parent / "tccp")
    rows = []
    for a, b in pairs:
        row = {"video": a, "speech": b, "source": judge(clip_file(b), clip_file(a), speech_file(b))}
        for name, path in packs.items():
            out = work / f"{name}_{a}__{b}.mp4"
            if not out.is_file():
                subprocess.run([tccp, "run", "--video", str(clip_file(a)), "--audio", str(speech_file(b)),
                                "--max-seconds", f"{args.seconds:g}", "--out", str(out), "--model", path, "--quiet"],
                               capture_output=True, text=True)
            row[name] = judge(clip_file(b), out, speech_file(b)) if out.is_file() else {"error": "tccp run wrote no video"}
        rows.append(row)
        print(a, "<-", b, " ".join(f"{k} {row[k].get('aperture_corr')}" for k in ("source", *packs)), flush=True)
    names = ["source", *packs]
    summary = {}
    for k in names:
        vals = [r[k]["aperture_corr"] for r in rows if "aperture_corr" in r[k]]
        summary[k] = {"mean_aperture_corr": sum(vals) / len(vals) if vals else None, "pairs": len(vals)}
    first = list(packs)[0]
    for k in list(packs)[1:]:
        d = [r[k]["aperture_corr"] - r[first]["aperture_corr"] for r in rows
             if "aperture_corr" in r[k] and "aperture_corr" in r[first]]
        summary[k][f"vs_{first}"] = {"mean_diff": sum(d) / len(d) if d else None, "up": sum(x > 0.02 for x in d),
                                     "down": sum(x < -0.02 for x in d), "flat": sum(abs(x) <= 0.02 for x in d)}
    report = {"seconds": args.seconds, "packs": packs, "checker": str(CHECKER.relative_to(SHARED.parent)),
              "pairs": rows, "summary": summary}
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(summary))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(rows)), 4.5))
        width = 0.8 / len(names)
        for i, k in enumerate(names):
            ys = [r[k].get("aperture_corr", float("nan")) for r in rows]
            m = summary[k]["mean_aperture_corr"]
            ax.bar([j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))], ys, width,
                   label=f"{k} (mean {m:.2f})" if m is not None else k)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([f"{r['video'][:12]}\n<- {r['speech'][:12]}" for r in rows], rotation=90, fontsize=7)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylabel("mouth-aperture r vs the speech's real mouth")
        ax.set_title(f"dubs judged by the shared mouth_sync.py ({args.seconds:g} s each)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
