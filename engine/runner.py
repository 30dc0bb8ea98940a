"""What one model call does for one window, and the requests/results it trades.

A `WindowRequest` holds everything a window needs: the source face crops and tracked
landmarks (crop px), the audio tokens and voice activity of its frames, the mel
windows (stage 2's audio condition), the session's references, the autoregressive
carry and the rung of the degradation ladder. `PipelineRunner.run_batch` runs several
requests with the same shapes as one batched pass of both stages:

1. stage 1 (unless `mode == "tracked"`): head-frame pose prior + audio -> lip and jaw
   coordinates, then the mouth-opening factor and the voice-activity rest, then back
   into the crop with the source's own head pose;
2. stage 2: per frame the best reference of the bank warped onto those landmarks, the
   lower face of the source masked out, the sketch; the mouth patch regenerated
   (`steps` sampler steps; 0 = the warped reference alone) and decoded;
3. the patch is blended into the source crop under the region mask.
The session pastes the result into the frame at source resolution (`engine.composite`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = [
    "ModelState",
    "SessionRefs",
    "WindowRequest",
    "WindowResult",
    "pad_frames",
    "PipelineRunner",
    "default_pack_missing",
    "check_region",
]


@dataclass
class ModelState:
    """The autoregressive carry: what slot 0 of the next window needs (the previous
    window's last frame)."""

    x: np.ndarray | None  # stage-1 vector of the last frame (None in tracked mode)
    latent: Any  # stage-2 patch latent (C, h, w) of the last frame (None after a warp-only window)
    tokens: np.ndarray  # (La, F) its audio tokens
    vad: float
    cv: np.ndarray | None  # its stage-1 control vector
    mel: np.ndarray  # (16, 80)
    mesh: np.ndarray  # (478, 2) its target landmarks (crop px)
    crop: np.ndarray  # (S, S, 3) its source crop
    source_mesh: np.ndarray  # (478, 2) its tracked landmarks
    gate: float = 1.0  # voice-activity gate level
    quiet: int = 0  # frames in a row without speech so far
    ref: int = -1  # the id (`ReferenceBank.ref_id`) of the bank reference its mouth came from


@dataclass
class SessionRefs:
    """A session's references: stage 2's bank and stage 1's reference landmarks,
    fixed when the session's first window is generated (so the lip anchor never jumps)."""

    bank: Any  # tccp.pipelines.faces.ReferenceBank
    stage1: Any = None  # tccp.pipelines.landmarks.References


@dataclass
class WindowRequest:
    mode: str  # 'generated' (stage 1 + 2) or 'tracked' (stage 2 on tracked landmarks)
    steps: int  # stage-2 sampler steps (0: warped reference only)
    sampler: str
    guidance: float
    window: int  # slots per window (new frames = window - 1)
    crops: np.ndarray  # (n, S, S, 3) source face crops, 1 <= n <= window - 1
    meshes: np.ndarray  # (n, 478, 2) tracked landmarks in crop px
    tokens: np.ndarray  # (n, La, F) audio tokens
    vad: np.ndarray  # (n,) voice activity
    mel: np.ndarray  # (n, 16, 80)
    refs: SessionRefs
    state: ModelState | None  # None: start from a first frame
    seed: int = 0
    mouth_scale: float = 1.0
    gate: bool = True
    silence_motion: float | None = None  # the gate's floor (EngineConfig.silence_motion)
    region: str = "mouth"  # 'head': stage 1's head mode and the whole-head warp
    contexts: np.ndarray | None = None  # (n, CONTEXT_DIM) head-masked context tokens (head region)
    stage1: Any = None  # the session's own stage-1 generator (EngineConfig.stage1); None: the pack's

    @property
    def n(self) -> int:
        return int(self.crops.shape[0])

    @property
    def restart(self) -> bool:
        return self.state is None


@dataclass
class WindowResult:
    faces: np.ndarray  # (n, S, S, 3) source crops with the regenerated mouth patch
    masks: np.ndarray  # (n, S, S) float region masks (where the crop differs)
    targets: np.ndarray  # (n, 478, 2) target landmarks (crop px)
    ref_index: np.ndarray  # (n,) reference used per frame
    state: ModelState
    stage1_s: float = 0.0
    stage2_s: float = 0.0
    batch: int = 1
    sketches: np.ndarray | None = field(default=None, repr=False)
    bank: Any = field(default=None, repr=False)  # the bank `ref_index` points into (a live bank may be re-chosen meanwhile)


def pad_frames(x: np.ndarray, n: int) -> np.ndarray:
    """Repeat the last item so a short (final) window has the batch's shape."""
    if x.shape[0] >= n:
        return x[:n]
    return np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)])


def default_pack_missing() -> bool:
    """True while the bundled model pack has not been trained/committed yet."""
    from tccp.pack import DEFAULT_PACK

    return not (DEFAULT_PACK / "config.json").is_file()


PIXEL_RESIDUAL = True
"""Stage 2's learned correction added to the warped reference in pixels (the warp's
pixels + decode(corrected latent) - decode(warp latent)) instead of the decoded
corrected latent: the warp keeps its own detail where the correction is zero, instead
of going through the autoencoder's round trip. Only `--steps N > 0` (the learned
correction) uses it. A/B on 14 clips (6 outside the validation set + the 8 validation
clips, 3 s, tracked landmarks, same run; docs/faces.md): mouth-box PSNR 25.31 -> 25.44 dB,
output mouth r 0.814 -> 0.853, sharpness 0.746 -> 0.797 (11, 11 and 14 of 14 clips up);
the warp alone scores 26.47 dB there, so the pack's default stays the warp."""

CORRECTION_GAIN = 0.5
"""How much of stage 2's learned change to the warp the pixel residual adds
(`warp + gain x (decode(corrected) - decode(warp latent))`; `PIXEL_RESIDUAL` only).
Half: the correction helps in some frames and hurts in others, and shrinking it keeps
the help. 14 clips, 3 s, 4 steps, same run (docs/faces.md, "How much of the
correction"): mouth-box PSNR with generated landmarks warp 25.20 / gain 1 25.43 / gain
0.5 25.45 dB, on tracked ones 29.67 / 28.82 / 29.75 dB."""

SAMPLER_NAMES = {"ddim": "ddim", "ddpm": "ddpm", "dpmpp": "dpmpp_2m", "dpmpp_2m": "dpmpp_2m"}


class PipelineRunner:
    """Runs `WindowRequest`s on a `tccp.pipeline.EditPipeline` (see module docstring)."""

    def __init__(self, pipeline: Any, size: int | None = None, *, references: Any = None) -> None:
        self.pipeline = pipeline
        self.size = int(size or pipeline.crop_size)
        self.frames = 8
        self.references = references  # an avatar's ReferenceBank (else each session's own)
        if references is not None and references.crops.shape[1] != self.size:
            raise ValueError(f"reference crops are {references.crops.shape[1]} px, the model works at {self.size} px")

    @classmethod
    def from_pack(cls, pack: str | None = None, device: str = "cpu", loader: Any = None,
                  **kwargs: Any) -> "PipelineRunner":
        """`loader(pack, device) -> EditPipeline` picks the runtime: None is torch
        (`tccp.pack.load_pack`); the commands pass `export.backends.pipeline_loader(name)`
        for onnxruntime / TensorRT (the engine itself never imports `export`)."""
        from tccp.pack import load_pack

        return cls((loader or load_pack)(pack, device=device), **kwargs)

    @classmethod
    def from_avatar(cls, avatar: Any, device: str = "cpu", loader: Any = None, **kwargs: Any) -> "PipelineRunner":
        """The avatar's pack with its reference bank (`tccp.avatars.store.Avatar`, or a
        name / folder resolved by `tccp.avatars.store.load_avatar`)."""
        from tccp.avatars.store import load_avatar

        av = load_avatar(avatar) if not hasattr(avatar, "bank") else avatar
        runner = cls.from_pack(str(av.path), device=device, loader=loader, **kwargs)
        runner.references = av.bank(runner.pipeline.template)
        return runner

    @classmethod
    def random(cls, device: str = "cpu", seed: int = 0, stage2: bool = True, size: int = 64) -> "PipelineRunner":
        """Random-weight models (tests, mechanics only): a tiny stage 1 and a tiny
        mouth-patch stage 2 for `size` px crops, with the real TAEF2 and Whisper
        encoders and the bundled head-frame template."""
        import torch

        from tccp.media.whisper import load_whisper
        from tccp.models.autoencoder import LATENT_CHANNELS, load_autoencoder
        from tccp.models.config import get_config
        from tccp.models.landmarks import LandmarkCodec, LandmarkNet, LandmarkNetConfig
        from tccp.models.mvcontrolnet import MVControlNet
        from tccp.pipeline import EditPipeline

        torch.manual_seed(seed)
        codec = LandmarkCodec(default_template(), "mouth")
        net = LandmarkNet(LandmarkNetConfig(gen_dim=codec.gen_dim, cv_dim=codec.cv_dim, ref_dim=codec.ref_dim,
                                            width=32, depth=1, control_depth=1, heads=2))
        model2 = None
        if stage2:
            from tccp.face.regions import patch_box

            x0, _, x1, _ = patch_box(size)
            lat = (x1 - x0) // 8
            cfg = get_config("tiny", latent_channels=LATENT_CHANNELS, latent_size=lat, channel_mult=(1,),
                             attention_levels=(0,), extra_channels=2 * LATENT_CHANNELS + 1, identity_tokens=lat * lat,
                             frames=8)
            model2 = MVControlNet(cfg).requires_grad_(False)
            with torch.no_grad():  # a random control branch that really depends on c_v
                for p in model2.control.parameters():
                    if p.abs().sum() == 0:
                        p.normal_(0, 0.02)
        pipe = EditPipeline.build(net.requires_grad_(False), codec, model2, load_autoencoder(device=device),
                                  load_whisper(device=device), crop_size=size)
        return cls(pipe.to(device))

    @property
    def template(self) -> np.ndarray:
        return self.pipeline.template

    @property
    def articulation(self) -> float:
        """The pack's gain on the generated lip opening (`stage1.articulation` in its
        config, 1 when absent): a regressor damps uncertain motion, the gain gives the
        generated mouth the real one's range (docs/lipsync.md, "Amplitude"). Users'
        `--mouth-scale` multiplies it; tracked landmarks are not scaled by it."""
        config = getattr(self.pipeline, "pack_config", None) or {}
        return float((config.get("stage1") or {}).get("articulation", 1.0))

    @property
    def default_steps(self) -> int:
        """Stage-2 steps the pack recommends (its sampler's); 0 for a warp-only pack."""
        editor = self.pipeline.stage2
        return int(editor.sampler.steps) if editor.model is not None else 0

    @property
    def triangulation(self) -> Any:
        return self.pipeline.stage2.tri

    @property
    def head_warper(self) -> Any:
        """Head region's stage 2 (`tccp.pipelines.heads.HeadWarper`), made on first use."""
        if getattr(self, "_head_warper", None) is None:
            from tccp.pipelines.heads import HeadWarper

            self._head_warper = HeadWarper(self.template, self.size)
        return self._head_warper

    def audio_features(self, live: bool, fps: float = 25.0) -> Any:
        """A session's audio-condition maker (`engine.features.AudioFeatures`)."""
        from engine.features import AudioFeatures

        from tccp.models.landmarks import audio_radius

        return AudioFeatures(self.pipeline.whisper, live=live, fps=fps, radius=audio_radius(self.pipeline.stage1.net.cfg))

    def batch_key(self, r: WindowRequest) -> tuple:
        return (r.mode, r.steps, r.sampler, float(r.guidance), r.window, r.restart, tuple(r.crops.shape[1:]), r.region,
                0 if r.stage1 is None else id(r.stage1))  # a session's own stage 1 batches alone

    # ------------------------------------------------------------------ stage 1
    def _stage1(self, requests: Sequence[WindowRequest], new: int) -> list[dict]:
        """Target landmarks for each request's new frames (plus the carry)."""
        from tccp.face import headframe as hf
        from tccp.face import mouth
        from tccp.face.mouth import scale_opening

        pipe = self.pipeline
        head = requests[0].region == "head"
        gen = requests[0].stage1 or pipe.stage1  # batch_key: one generator per batch
        if head and requests[0].mode != "tracked":
            check_region(self, "head")  # one line naming the missing head stage 1
            gen = pipe.stage1_head
        codec = gen.codec
        template = codec.template
        outs = []
        per_req = []
        for r in requests:
            meshes = pad_frames(r.meshes, new)
            heads, pose = hf.to_head(meshes, template)
            if r.refs.stage1 is None:
                bank = r.refs.bank
                bheads, bpose = hf.to_head(bank.meshes, template)
                from tccp.data.landmarks import reference_frames

                idx = reference_frames(bheads, 4)
                params = bpose.params(self.size)  # head mode's pose unit: the crop
                r.refs.stage1 = gen.references(bheads[idx], params[idx] if codec.mode == "head" else None)
            per_req.append((meshes, heads, pose))
        if requests[0].mode == "tracked":
            for r, (meshes, heads, pose) in zip(requests, per_req):
                if r.mouth_scale != 1.0:
                    heads = scale_opening(heads, r.refs.stage1.rest, r.mouth_scale)
                outs.append({"heads": heads, "pose": pose, "x": None, "gate": 1.0})
            return outs
        restart = requests[0].restart
        tokens = np.stack([pad_frames(r.tokens, new) for r in requests]).astype(np.float32)
        vad = np.stack([pad_frames(r.vad, new) for r in requests]).astype(np.float32)
        if codec.mode == "head":
            cv = np.stack([pad_frames(np.asarray(r.contexts, np.float32), new) for r in requests])
        else:
            cv = np.stack([codec.control(h) for _, h, _ in per_req])
        refs = [r.refs.stage1 for r in requests]
        if restart:
            first = gen.window(tokens[:, :1], vad[:, :1], cv[:, :1], refs, None, seed=[r.seed for r in requests])
            prev = first[:, 0]
            rest = gen.window(tokens, vad, cv, refs, prev, seed=[r.seed for r in requests])  # slot 0 = frame 0 itself
            x = np.concatenate([first, rest[:, 1:]], axis=1)[:, :new]
            x[:, 1:] = rest[:, 1:new]
        else:
            st = [r.state for r in requests]
            prev = np.stack([s.x for s in st])
            tok = np.concatenate([np.stack([s.tokens for s in st])[:, None], tokens], 1)
            vv = np.concatenate([np.array([[s.vad] for s in st], np.float32), vad], 1)
            cc = np.concatenate([np.stack([s.cv for s in st])[:, None], cv], 1)
            x = gen.window(tok, vv, cc, refs, prev, seed=[r.seed for r in requests])[:, 1:]
        for i, (r, (meshes, heads, pose)) in enumerate(zip(requests, per_req)):
            ref = r.refs.stage1
            gen_heads, gen_pose = codec.decode(x[i], ref.anchor, heads, ref.pose)
            if gen_pose is not None:  # head mode: the generated pose places the head
                pose = hf.Pose.from_params(gen_pose, self.size)
            level = 0.0 if r.state is None else r.state.gate  # a stream starts at rest
            quiet = 0 if r.state is None else r.state.quiet
            if r.gate:
                gen_heads, level, quiet = _gate(gen_heads, ref.rest, vad[i], level, quiet, r.silence_motion)
            gain = r.mouth_scale * self.articulation
            if gain != 1.0:
                gen_heads = scale_opening(gen_heads, ref.rest, gain)
            if gen_pose is None and mouth.JAW_SIDES:
                gen_heads = mouth.keep_jaw_sides(gen_heads, heads)
            outs.append({"heads": gen_heads, "pose": pose, "x": x[i], "gate": level, "quiet": quiet, "cv": cv[i],
                         "tokens": tokens[i], "vad": vad[i]})
        return outs

    # ------------------------------------------------------------------ main
    def run_batch(self, requests: Sequence[WindowRequest]) -> list[WindowResult]:
        import torch

        from tccp.face import headframe as hf

        pipe = self.pipeline
        editor = pipe.stage2
        r0 = requests[0]
        new = r0.window - 1
        t0 = time.perf_counter()
        s1 = self._stage1(requests, new)
        targets = [hf.to_image(o["heads"], o["pose"]) for o in s1]
        t1 = time.perf_counter()
        # stage 2 inputs for every frame of the window (slot 0 = the carried frame)
        inputs, banks = [], []
        head = r0.region == "head"
        for r, tg in zip(requests, targets):
            bank = self.references if self.references is not None else r.refs.bank
            crops = pad_frames(r.crops, new)
            srcs = pad_frames(r.meshes, new)
            if r.state is not None:
                crops = np.concatenate([r.state.crop[None], crops])
                srcs = np.concatenate([r.state.source_mesh[None], srcs])
                tg = np.concatenate([r.state.mesh[None], tg])
            prev_ref = -1 if r.state is None else bank.index_of(r.state.ref)
            inputs.append(self.head_warper.inputs(crops, tg, srcs, bank, prev_ref) if head else
                          editor.inputs(crops, tg, srcs, bank, prev_ref=prev_ref))
            banks.append(bank)
        mel = np.stack([pad_frames(r.mel, new) for r in requests]).astype(np.float32)
        k0 = 0 if r0.restart else 1
        warp_only = r0.steps <= 0 or editor.model is None
        how = {"sampler": SAMPLER_NAMES.get(r0.sampler, r0.sampler), "cfg_scale": float(r0.guidance)}
        lat_new = None
        if head:  # the whole head is the warped reference (no head-mode denoiser: tccp.pipelines.heads)
            patches = None
        elif warp_only:
            # the warped reference is the patch: no autoencoder, no denoiser
            patches = np.stack([d["warped"][k0:] for d in inputs])
        else:
            prevs = [None if r.state is None else r.state.latent for r in requests]
            if r0.restart or any(p is None for p in prevs):
                # first-frame step (a one-frame window, no clean slot), then the window
                # with slot 0 pinned to that frame
                ins = [{k: v[k0:] for k, v in d.items()} for d in inputs]
                first = [{k: v[:1] for k, v in d.items()} for d in ins]
                warped = editor.encode_warped(ins)  # once: the denoiser's start and the residual's base
                lat0 = editor.window(first, banks, mel[:, :1], None, steps=r0.steps, seed=[r.seed for r in requests],
                                     warped=warped[:, :, :1], **how)
                lat_new = editor.window(ins, banks, mel, lat0[:, :, 0], steps=r0.steps, seed=[r.seed for r in requests],
                                        warped=warped, **how)
            else:
                mel = np.concatenate([np.stack([r.state.mel for r in requests])[:, None], mel], 1)
                prev = torch.stack(prevs)
                warped = editor.encode_warped(inputs)
                lat_new = editor.window(inputs, banks, mel, prev, steps=r0.steps, seed=[r.seed for r in requests],
                                        warped=warped, **how)[:, :, 1:]
                warped = warped[:, :, 1:]
            patches = editor.decode(lat_new)
            if PIXEL_RESIDUAL:
                patches = editor.pixel_residual(patches, np.stack([d["warped"][k0:] for d in inputs]), warped,
                                                gain=CORRECTION_GAIN)
        t2 = time.perf_counter()
        x0, y0, x1, y1 = editor.patch
        results = []
        for i, r in enumerate(requests):
            d = inputs[i]
            n = r.n
            if head:  # the head warp's own targets: its eyes are the reference's (tccp.pipelines.heads)
                faces, masks = d["faces"][k0:], d["mask"][k0:]
                targets[i] = d["targets"][k0:]
            else:
                faces = pad_frames(r.crops, new).copy()
                masks = np.zeros(faces.shape[:3], np.float32)
                for k in range(new):
                    m = d["mask"][k0 + k][..., None]
                    region = faces[k, y0:y1, x0:x1].astype(np.float32)
                    faces[k, y0:y1, x0:x1] = np.clip(region * (1 - m) + patches[i, k] * m + 0.5, 0, 255).astype(np.uint8)
                    masks[k, y0:y1, x0:x1] = d["mask"][k0 + k]
            o = s1[i]
            last = n - 1
            state = ModelState(
                x=None if o["x"] is None else o["x"][last].copy(),
                latent=None if lat_new is None else lat_new[i, :, last].detach().clone(),
                tokens=r.tokens[last].copy(), vad=float(r.vad[last]),
                cv=None if o.get("cv") is None else o["cv"][last].copy(),
                mel=np.asarray(r.mel[last], np.float32).copy(),
                mesh=targets[i][last].copy(), crop=r.crops[last].copy(), source_mesh=r.meshes[last].copy(),
                gate=float(o["gate"]), quiet=int(o.get("quiet", 0)), ref=banks[i].ref_id(int(d["ref"][k0 + last])),
            )
            results.append(WindowResult(
                faces=faces[:n], masks=masks[:n], targets=targets[i][:n], ref_index=d["ref"][k0:k0 + n],
                state=state, stage1_s=t1 - t0, stage2_s=t2 - t1, batch=len(requests),
                sketches=d["sketches"][k0:k0 + n], bank=banks[i],
            ))
        return results


def _gate(heads: np.ndarray, rest: np.ndarray, vad: np.ndarray, level: float, quiet: int = 0,
          floor: float | None = None) -> tuple[np.ndarray, float, int]:
    """`tccp.pipelines.landmarks.apply_gate` for a stream: the gate's state carries over;
    `floor` None: the default share of motion kept in silence (`GATE_FLOOR`)."""
    from tccp.pipelines.landmarks import gate_levels, rest_mouth

    g, level, quiet = gate_levels(vad, level, quiet)
    return rest_mouth(heads, rest, g, floor), level, quiet


def check_region(model: Any, region: str, landmarks: str = "generated") -> str:
    """`region` if `model` (a SharedModel or PipelineRunner) can edit it, else a one-line
    `TCCPError`: the head region with generated landmarks needs a head-mode stage 1."""
    from tccp.errors import TCCPError

    if region not in ("mouth", "head"):
        raise TCCPError(f"--region {region}: choose mouth or head")
    runner = getattr(model, "runner", model)
    pipe = getattr(runner, "pipeline", None)
    if region == "head" and landmarks == "generated" and getattr(pipe, "stage1_head", None) is None:
        raise TCCPError("--region head: this model pack has no head-mode stage 1 (export one with "
                        "tccp train --export-pack ... --stage1-head RUN, or pass --landmarks tracked)")
    return region


def default_template() -> np.ndarray:
    """The bundled pack's head-frame template (a mean face), for random-weight runners."""
    from tccp.pack import DEFAULT_PACK

    from safetensors import safe_open

    try:
        with safe_open(str(DEFAULT_PACK / "stage1.safetensors"), "pt") as f:
            return f.get_tensor("template").float().numpy()
    except Exception:  # no pack yet: the template fitted on the shared clips, rounded
        return _FALLBACK_TEMPLATE()


def _FALLBACK_TEMPLATE() -> np.ndarray:
    path = __import__("pathlib").Path(__file__).resolve().parents[1] / "tccp" / "assets" / "face_template.npy"
    return np.load(path).astype(np.float32)
