"""What one model call does for one window, and the requests/results it trades.

A `WindowRequest` holds everything a window needs (head-masked context crops, tracked
sketches, mel windows, identity crop, the autoregressive carry and the rung of the
degradation ladder); `PipelineRunner.run_batch` turns several such requests with the
same shapes into one batched pass of `tccp.pipeline.TCCPPipeline`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = [
    "ModelState",
    "WindowRequest",
    "WindowResult",
    "pad_frames",
    "PipelineRunner",
    "default_pack_missing",
]


@dataclass
class ModelState:
    """The autoregressive carry: everything slot 0 of the next window needs, i.e. the
    previous window's last frame (latents are raw TAEF2 latents, (C, h, w))."""

    face: Any  # generated face latent: stage-2 conditioning slot
    sketch: Any  # sketch latent (generated, or tracked in 'tracked' mode): stage-1 slot
    context: Any  # head-masked context latent of that frame (stage-1 c_v of slot 0)
    mel: np.ndarray  # (16, 80) its mel window (c_l of slot 0)
    ref_index: int | None = None  # avatar reference used (keeps the choice stable)


@dataclass
class WindowRequest:
    mode: str  # 'generated' (stage 1 + 2) or 'tracked' (stage 2 on tracked sketches)
    steps: int
    sampler: str
    guidance: float
    window: int  # slots per window (new frames = window - 1)
    contexts: np.ndarray  # (n, S, S, 3) uint8 head-masked context crops, 1 <= n <= window - 1
    sketches: np.ndarray  # (n, S, S, 3) uint8 sketches of the tracked landmarks
    mel: np.ndarray  # (n, 16, 80) float32
    identity: np.ndarray  # (S, S, 3) uint8 identity face crop
    state: ModelState | None  # None: start from a first frame (first-frame step)
    seed: int = 0
    want_sketches: bool = False  # decode the stage-1 sketches (previews/debug)
    identity_latent: Any = None  # (C, h, w) cached encoding of `identity` (from a result)

    @property
    def n(self) -> int:
        return int(self.contexts.shape[0])

    @property
    def restart(self) -> bool:
        return self.state is None


@dataclass
class WindowResult:
    faces: np.ndarray  # (n, S, S, 3) uint8 generated face crops
    state: ModelState
    sketches: np.ndarray | None = None  # (n, S, S, 3) uint8 decoded stage-1 sketches
    stage1_s: float = 0.0
    stage2_s: float = 0.0
    batch: int = 1
    identity_latent: Any = None  # pass back in later requests to skip re-encoding


def pad_frames(x: np.ndarray, n: int) -> np.ndarray:
    """Repeat the last item so a short (final) window has the batch's shape."""
    if x.shape[0] >= n:
        return x[:n]
    return np.concatenate([x, np.repeat(x[-1:], n - x.shape[0], axis=0)])


def default_pack_missing() -> bool:
    """True while the bundled model pack has not been trained/committed yet."""
    from tccp.pack import DEFAULT_PACK

    return not (DEFAULT_PACK / "config.json").is_file()


SAMPLER_NAMES = {"ddim": "ddim", "ddpm": "ddpm", "dpmpp": "dpmpp_2m", "dpmpp_2m": "dpmpp_2m"}


class _StageTimer:
    """Accumulates the forward time of one stage via module hooks (every sampler step
    calls the stage once), so stage 1 and stage 2 can be reported separately even
    though the pipeline runs them inside one call."""

    def __init__(self, module: Any) -> None:
        import torch

        self.total = 0.0
        self._t0 = 0.0
        self._cuda = torch.cuda.is_available()
        self._sync = lambda: None
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module: Any, args: Any) -> None:
        if self._cuda and next(module.parameters()).is_cuda:
            import torch

            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def _post(self, module: Any, args: Any, out: Any) -> None:
        if self._cuda and next(module.parameters()).is_cuda:
            import torch

            torch.cuda.synchronize()
        self.total += time.perf_counter() - self._t0


class PipelineRunner:
    """Runs `WindowRequest`s on a `tccp.pipeline.TCCPPipeline` (see module docstring).

    Per batch: encode the crops with TAEF2 (contexts; tracked sketches in 'tracked'
    mode; identity faces), run `first_frame` for streams that (re)start, then one
    `window` call with slot 0 = each stream's carried last frame, decode the faces.
    Short (final) windows are padded by repeating their last frame so every request
    of a batch has the same shapes; padded outputs are dropped.

    `mouth_scale` (`tccp.face.mouth`, ControlTalk's alpha) scales the lip opening of the
    sketches that drive stage 2: tracked sketches are warped before encoding; stage 1's
    sketch latents are decoded, warped and re-encoded (only when the factor is not 1).
    `references` (`tccp.avatars.refs.ReferenceBank`, an avatar's) replaces the requests'
    identity: each window gets the reference nearest to its tracked head pose. Both
    are per model (every session on it), not per request.
    """

    def __init__(self, pipeline: Any, size: int | None = None, *, mouth_scale: float = 1.0,
                 references: Any = None) -> None:
        from tccp.face.mouth import check_scale

        if pipeline.autoencoder is None:
            raise ValueError("PipelineRunner needs a pipeline with an autoencoder")
        self.pipeline = pipeline
        cfg = pipeline.stage1.cfg
        self.size = int(size or pipeline.pack_config.get("crop_size") or cfg.latent_size * 8)
        self.frames = int(cfg.frames)
        self.mouth_scale = check_scale(mouth_scale)
        self.references = references
        if references is not None and references.crops.shape[1] != self.size:
            raise ValueError(f"reference crops are {references.crops.shape[1]} px, the model works at {self.size} px")
        self._t1 = _StageTimer(pipeline.stage1)
        self._t2 = _StageTimer(pipeline.stage2)

    @classmethod
    def from_pack(cls, pack: str | None = None, device: str = "cpu", backend: str = "torch",
                  **kwargs: Any) -> "PipelineRunner":
        from tccp.errors import TCCPError
        from tccp.pack import load_pack

        if backend == "torch":
            return cls(load_pack(pack, device=device), **kwargs)
        if backend not in ("onnxruntime", "tensorrt"):
            raise TCCPError(f"--backend {backend}: unknown (choose torch, onnxruntime or tensorrt)")
        from export.backends import load_pipeline  # exports the pack on first use (cached)

        return cls(load_pipeline(pack, backend=backend, device=device), **kwargs)

    @classmethod
    def from_avatar(cls, avatar: Any, device: str = "cpu", backend: str = "torch", **kwargs: Any) -> "PipelineRunner":
        """The avatar's fine-tuned pack with its references (`tccp.avatars.store.Avatar`, or a
        name / folder resolved by `tccp.avatars.store.load_avatar`)."""
        from tccp.avatars.store import load_avatar

        av = load_avatar(avatar) if not hasattr(avatar, "bank") else avatar
        return cls.from_pack(str(av.path), device=device, backend=backend, references=av.bank(), **kwargs)

    @classmethod
    def random(cls, config: str = "tiny", device: str = "cpu", seed: int = 0, **overrides: Any) -> "PipelineRunner":
        """Random-weight models of a named config (tests, and the demo until the
        trained pack exists). Latent channels are forced to TAEF2's 32."""
        import torch

        from tccp.models.autoencoder import LATENT_CHANNELS, load_autoencoder
        from tccp.models.config import get_config
        from tccp.models.mvcontrolnet import MVControlNet
        from tccp.pipeline import TCCPPipeline

        cfg = get_config(config, latent_channels=LATENT_CHANNELS, **overrides)
        torch.manual_seed(seed)
        s1, s2 = MVControlNet(cfg), MVControlNet(cfg)
        for m in (s1, s2):
            m.requires_grad_(False)
            # the control branch starts at exactly zero (zero convs); nudge it so the
            # random model really depends on its video condition, like a trained one
            with torch.no_grad():
                for p in m.control.parameters():
                    if p.abs().sum() == 0:
                        p.normal_(0, 0.02)
        pipe = TCCPPipeline(s1, s2, load_autoencoder(device=device)).to(device)
        return cls(pipe)

    def batch_key(self, r: WindowRequest) -> tuple:
        return (r.mode, r.steps, r.sampler, float(r.guidance), r.window, r.restart,
                tuple(r.contexts.shape[1:]), r.want_sketches)

    # ------------------------------------------------------------------ helpers
    def _encode(self, images: np.ndarray) -> Any:
        """(..., S, S, 3) uint8 -> (..., C, h, w) latents on the pipeline's device."""
        lead = images.shape[:-3]
        flat = images.reshape((-1,) + images.shape[-3:])
        z = self.pipeline.autoencoder.encode_images(flat)
        z = z.to(self.pipeline.device, self.pipeline.dtype)
        return z.reshape(tuple(lead) + tuple(z.shape[1:]))

    def _warp(self, sketches: np.ndarray) -> np.ndarray:
        """(..., S, S, 3) sketch images with the mouth opening scaled by `mouth_scale`."""
        from tccp.face.mouth import warp_mouth

        flat = sketches.reshape((-1,) + sketches.shape[-3:])
        out = np.stack([warp_mouth(img, self.mouth_scale) for img in flat])
        return out.reshape(sketches.shape)

    def _sketch_edit(self) -> Any:
        """The stage-1 -> stage-2 edit for `mouth_scale` (None when the factor is 1)."""
        if self.mouth_scale == 1.0:
            return None
        from einops import rearrange

        pipe = self.pipeline

        def edit(lat: Any) -> Any:  # raw latents (B, C, N, h, w)
            b = lat.shape[0]
            imgs = pipe.decode(lat).cpu().numpy()  # (B, N, S, S, 3)
            z = self._encode(self._warp(imgs))  # (B, N, C, h, w)
            return rearrange(z, "b n c h w -> b c n h w", b=b).to(lat.dtype)

        return edit

    def _references(self, requests: Sequence[WindowRequest]) -> tuple[Any, list[int]]:
        """Per request, the avatar reference nearest to its head pose, as latents."""
        import torch

        bank = self.references
        lat = bank.latents(self._encode)  # (K, C, h, w)
        idx = [bank.choose(r.sketches[0] if r.n else None, r.state.ref_index if r.state is not None else None)
               for r in requests]
        return lat[torch.as_tensor(idx, device=lat.device)], idx

    def run_batch(self, requests: Sequence[WindowRequest]) -> list[WindowResult]:
        import torch
        from einops import rearrange

        pipe = self.pipeline
        r0 = requests[0]
        new = r0.window - 1
        b = len(requests)
        t_start = time.perf_counter()
        s1_before, s2_before = self._t1.total, self._t2.total
        steps, cfg_scale = r0.steps, r0.guidance
        sampler = SAMPLER_NAMES.get(r0.sampler, r0.sampler)
        tracked = r0.mode == "tracked"
        restart = r0.restart
        gen = torch.Generator(device="cpu").manual_seed(int(r0.seed))

        # (B, new, ...) inputs for the new frames, padded to the batch's shape
        ctx_img = np.stack([pad_frames(r.contexts, new) for r in requests])
        mel = np.stack([pad_frames(r.mel, new) for r in requests]).astype(np.float32)
        t_enc = time.perf_counter()
        ctx_lat = self._encode(ctx_img)  # (B, new, C, h, w)
        ref_idx: list[int | None] = [None] * b
        if self.references is not None:
            ref_lat, ref_idx = self._references(requests)
        elif all(r.identity_latent is not None for r in requests):
            ref_lat = torch.stack([r.identity_latent for r in requests]).to(pipe.device, pipe.dtype)
        else:
            ref_lat = self._encode(np.stack([r.identity for r in requests]))  # (B, C, h, w)
        sk_lat = None
        if tracked:
            sk_img = np.stack([pad_frames(r.sketches, new) for r in requests])
            if self.mouth_scale != 1.0:
                sk_img = self._warp(sk_img)
            sk_lat = self._encode(sk_img)
        edit = None if tracked else self._sketch_edit()
        enc_s = time.perf_counter() - t_enc
        mel_t = torch.from_numpy(mel).to(pipe.device, pipe.dtype)  # (B, new, 16, 80)

        def five(x: Any) -> Any:  # (B, N, C, h, w) -> (B, C, N, h, w)
            return rearrange(x, "b n c h w -> b c n h w")

        first_face = None
        if restart:
            # first-frame step on each stream's first new frame
            sk0, face0 = pipe.first_frame(
                five(ctx_lat[:, :1]), mel_t[:, :1], ref_lat, steps=steps, sampler=sampler,
                cfg_scale=cfg_scale, tracked_sketch_lat=five(sk_lat[:, :1]) if tracked else None,
                generator=gen, sketch_edit=edit,
            )
            first_face = face0  # (B, C, 1, h, w)
            prev_face, prev_sketch = face0[:, :, 0], sk0[:, :, 0]
            prev_ctx, prev_mel = ctx_lat[:, 0], mel_t[:, 0]
            # the window then generates frames 1.. (one more padded slot at the end)
            ctx_new = torch.cat([ctx_lat[:, 1:], ctx_lat[:, -1:]], dim=1)
            mel_new = torch.cat([mel_t[:, 1:], mel_t[:, -1:]], dim=1)
            sk_new = torch.cat([sk_lat[:, 1:], sk_lat[:, -1:]], dim=1) if tracked else None
        else:
            st = [r.state for r in requests]
            prev_face = torch.stack([s.face for s in st]).to(pipe.device, pipe.dtype)
            prev_sketch = torch.stack([s.sketch for s in st]).to(pipe.device, pipe.dtype)
            prev_ctx = torch.stack([s.context for s in st]).to(pipe.device, pipe.dtype)
            prev_mel = torch.from_numpy(np.stack([s.mel for s in st])).to(pipe.device, pipe.dtype)
            ctx_new, mel_new, sk_new = ctx_lat, mel_t, sk_lat

        ctx_win = torch.cat([prev_ctx[:, None], ctx_new], dim=1)  # (B, N, C, h, w)
        mel_win = torch.cat([prev_mel[:, None], mel_new], dim=1)  # (B, N, 16, 80)
        tracked_win = torch.cat([prev_sketch[:, None], sk_new], dim=1) if tracked else None
        sk_out, face_out = pipe.window(
            five(ctx_win), mel_win, ref_lat, prev_sketch, prev_face, steps=steps, sampler=sampler,
            cfg_scale=cfg_scale, tracked_sketch_lat=five(tracked_win) if tracked else None,
            generator=gen, sketch_edit=edit,
        )  # (B, C, new, h, w) each
        if restart:
            face_out = torch.cat([first_face, face_out], dim=2)
            sk_out = torch.cat([sk0, sk_out], dim=2)
            ctx_used, mel_used = torch.cat([prev_ctx[:, None], ctx_new], 1), torch.cat([prev_mel[:, None], mel_new], 1)
        else:
            ctx_used, mel_used = ctx_new, mel_new
        faces = pipe.decode(face_out).cpu().numpy()  # (B, n_out, S, S, 3)
        sketches = pipe.decode(sk_out).cpu().numpy() if r0.want_sketches else None
        if sketches is not None and edit is not None:
            sketches = self._warp(sketches)  # what drove stage 2 (stage 1's output is carried raw)

        total = time.perf_counter() - t_start
        stage1 = enc_s + (self._t1.total - s1_before)
        stage2 = max(0.0, total - stage1)
        results = []
        for i, r in enumerate(requests):
            n = r.n
            last = n - 1
            state = ModelState(
                face=face_out[i, :, last].detach().clone(),
                sketch=sk_out[i, :, last].detach().clone(),
                context=ctx_used[i, last].detach().clone(),
                mel=mel_used[i, last].detach().cpu().numpy().astype(np.float32),
                ref_index=ref_idx[i],
            )
            results.append(WindowResult(
                faces=faces[i, :n].copy(),
                state=state,
                sketches=None if sketches is None else sketches[i, :n].copy(),
                stage1_s=stage1,
                stage2_s=stage2,
                batch=b,
                identity_latent=ref_lat[i].detach().clone(),
            ))
        return results
