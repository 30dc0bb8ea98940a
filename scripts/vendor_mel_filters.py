"""Write the mel filterbanks the project uses to tccp/assets/mel_filters.npz.

Why ship numbers instead of calling `librosa.filters.mel` at run time: importing
librosa's utilities compiles its numba kernels, 10-19 s on this 2-core CPU the first
time a fresh install runs (cached afterwards, still ~3 s of imports per process), and
that landed inside the first window of `make demo` and of a first live call. The
filters are constants, so they are computed once here with librosa (ISC licence), the
way OpenAI's Whisper ships its `mel_filters.npz`; `tests/test_audio.py` checks that the
stored arrays still equal librosa's.

    python scripts/vendor_mel_filters.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DST = ROOT / "tccp" / "assets" / "mel_filters.npz"


def main() -> None:
    import sys

    sys.path.insert(0, str(ROOT))
    import librosa

    from tccp.media.audio import MEL, mel_key

    banks = {
        # Whisper's front end: slaney mel, 16 kHz, n_fft 400, 80 bins, 0-8 kHz
        mel_key(16000, 400, 80, 0.0, 8000.0): librosa.filters.mel(sr=16000, n_fft=400, n_mels=80),
        # Wav2Lip's (tccp.media.audio.MEL)
        mel_key(MEL.sr, MEL.n_fft, MEL.n_mels, MEL.fmin, MEL.fmax): librosa.filters.mel(
            sr=MEL.sr, n_fft=MEL.n_fft, n_mels=MEL.n_mels, fmin=MEL.fmin, fmax=MEL.fmax),
    }
    np.savez_compressed(DST, **{k: v.astype(np.float32) for k, v in banks.items()})
    print(f"wrote {DST} ({', '.join(f'{k} {v.shape}' for k, v in banks.items())}; librosa {librosa.__version__})")


if __name__ == "__main__":
    main()
