"""Where the output's lip sync is lost: stage 1 (its target mouths against the real
ones) or stage 2 (the output's mouths against the targets it was given).

For each clip (reconstruction, the pack's defaults, no adaptation, warp only) it runs
`tccp run`'s engine with generated and with tracked landmarks, records the target
landmarks of every window, tracks the output video with the evaluation's own tracker,
and reports the mouth-aperture correlations r(output, target), r(target, real) and
r(output, real), the aperture spreads against the real mouth's, and how often the
reference in use changed. Needs `../shared` (clips). Usage:
    python scripts/faithfulness.py --json out/faith.json [--seconds 3] [CLIP ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OTHER = ["vx_short_AOC", "sadtalker_RD_Radio34_000", "vr_face2", "lipnet_sbia1a", "vx_vasa_5", "styletalk_andrew_clip_1"]


def _r(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 4 or a[ok].std() == 0 or b[ok].std() == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def main() -> None:
    import engine.runner as R
    from tccp.data.datasets import VALIDATION_CLIPS
    from tccp.face.geometry import mouth_aperture
    from tccp.media.io import load_clip
    from tccp.metrics.evaluate import track_frames
    from tccp.metrics.suite import SuiteConfig, _clip_audio, engine_generator, resolve_clips

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("clips", nargs="*", help="clip stems (default: 6 non-validation clips + the validation clips)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("out/faithfulness"))
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    cfg = SuiteConfig(clips=a.clips or OTHER + list(VALIDATION_CLIPS), seconds=a.seconds, tracked=False)
    gen, close = engine_generator(cfg)
    targets: list[tuple[np.ndarray, np.ndarray]] = []
    run_batch = R.PipelineRunner.run_batch

    def recording(self, reqs):  # the same call, its targets kept
        out = run_batch(self, reqs)
        targets.extend((o.targets.copy(), o.ref_index.copy()) for o in out)
        return out

    R.PipelineRunner.run_batch = recording
    res: dict = {}
    try:
        for path in resolve_clips(cfg):
            audio = _clip_audio(path)
            real = track_frames(load_clip(path, audio=audio, max_seconds=a.seconds, require_audio=False).frames)
            bank = gen.bank(path, a.seconds)[0]
            kw = {"audio": audio} if audio is not None else {}
            if bank is not None:
                kw["references"] = bank
            for lm in ("generated", "tracked"):
                targets.clear()
                p = a.work / f"{path.stem}.{lm}.mp4"
                p.unlink(missing_ok=True)
                gen(path, p, a.seconds, landmarks=lm, steps=0, adapt=False, **kw)
                tg = np.concatenate([t for t, _ in targets])
                refs = np.concatenate([r for _, r in targets])
                out = track_frames(load_clip(p, require_audio=False, min_frames=1).frames)
                n = min(len(tg), len(out.aperture), len(real.aperture))
                ta = np.asarray(mouth_aperture(tg[:n]), float).reshape(-1)
                oa, ra = out.aperture[:n], real.aperture[:n]
                row = dict(out_target=_r(oa, ta), target_real=_r(ta, ra), out_real=_r(oa, ra),
                           spread_t=float(np.nanstd(ta) / np.nanstd(ra)), spread_o=float(np.nanstd(oa) / np.nanstd(ra)),
                           switches=int((np.diff(refs[:n]) != 0).sum()), nrefs=int(len(set(refs[:n].tolist()))))
                res.setdefault(path.stem, {})[lm] = row
                print(path.stem, lm, {k: round(v, 3) for k, v in row.items()}, flush=True)
                a.json.write_text(json.dumps(res, indent=1))
    finally:
        close()
    for lm in ("generated", "tracked"):
        rows = [res[c][lm] for c in res]
        print(lm, {k: round(float(np.nanmean([r[k] for r in rows])), 3) for k in rows[0]})


if __name__ == "__main__":
    main()
