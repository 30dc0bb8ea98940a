"""Stage-1 training windows (mouth mode): what the control branch is given."""

import numpy as np


def _windows(p_other: float):
    from engine.runner import default_template
    from tccp.data.landmarks import LandmarkClip, LandmarkDataConfig, LandmarkWindows
    from tccp.face import headframe as hf
    from tccp.models.landmarks import LandmarkCodec

    t = default_template()
    codec = LandmarkCodec(t, "mouth")
    n = 60
    heads = np.repeat(t[None], n, 0).astype(np.float32)
    heads[:, list(hf.REST), 1] += (0.01 * np.arange(n, dtype=np.float32))[:, None]  # the rest of the face tells the time
    rng = np.random.default_rng(0)
    feats = {"full": rng.normal(size=(2 * n + 10, 5, 16)).astype(np.float16)}
    vad = {"full": (np.arange(n, dtype=np.float32) / n)}  # ... and so does the voice activity
    clip = LandmarkClip("x", heads, np.zeros((n, 4), np.float32), vad, feats, t, np.zeros(n, bool))
    cfg = LandmarkDataConfig(mix={"full": 1.0}, p_mirror=0.0, jitter=0.0, frame_noise=0.0,
                             p_control_other=p_other)
    return LandmarkWindows([clip], codec, cfg, seed=1), n


def test_control_comes_from_the_window_itself_by_default():
    data, n = _windows(0.0)
    b = data.sample(12)
    cv_time = b["cv"][:, :, 1].numpy() * data.codec.scale / 0.01  # first rest point's y offset
    assert np.allclose(cv_time, b["vad"].numpy() * n, atol=1e-3)


def test_control_elsewhere_comes_from_another_stretch_of_the_clip():
    data, n = _windows(1.0)
    b = data.sample(12)
    cv_time = b["cv"][:, :, 1].numpy() * data.codec.scale / 0.01
    own = b["vad"].numpy() * n
    assert np.allclose(np.diff(cv_time, axis=1), 1.0, atol=1e-3)  # still consecutive frames of the clip
    assert (np.abs(cv_time[:, 0] - own[:, 0]) > 0.5).sum() >= 10  # but not the window's own


def test_control_elsewhere_motion_keeps_the_windows_own_mean():
    data, n = _windows(1.0)
    data.cfg.control_other_motion = True
    b = data.sample(12)
    cv_time = b["cv"][:, :, 1].numpy() * data.codec.scale / 0.01
    own = b["vad"].numpy() * n
    # a ramp's motion is the same wherever it is taken: with the window's own mean back,
    # the rest points read as the window's own
    assert np.allclose(cv_time, own, atol=1e-3)
