"""Copy Silero VAD's 16 kHz weights (safetensors, MIT) from its PyPI wheel into tccp/assets/vad/.

    pip download --no-deps silero-vad==6.2.3 -d /tmp/w
    python scripts/vendor_silero_vad.py /tmp/w/silero_vad-6.2.3-py3-none-any.whl

The wheel's `silero_vad_16k.safetensors` is copied unchanged with the wheel's LICENSE;
`tccp/media/vad.py` holds the torch module that loads it (no silero-vad, torchaudio or
onnxruntime needed at run time).
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DST = ROOT / "tccp" / "assets" / "vad"


def main(wheel: Path) -> None:
    DST.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        (DST / "silero_vad_16k.safetensors").write_bytes(z.read("silero_vad/data/silero_vad_16k.safetensors"))
        lic = [n for n in z.namelist() if n.endswith("licenses/LICENSE") or n.endswith("/LICENSE")]
        (DST / "LICENSE").write_bytes(z.read(lic[0]))
    (DST / "README.md").write_text(
        "# Silero VAD weights (vendored)\n\n`silero_vad_16k.safetensors` is Silero VAD (v5/v6, 16 kHz) from the "
        f"`silero-vad` wheel ({wheel.name}), MIT License (see `LICENSE`), copied unchanged by "
        "`scripts/vendor_silero_vad.py`. Loaded by `tccp/media/vad.py`.\n"
    )
    sys.path.insert(0, str(ROOT))
    from tccp.media.vad import load_vad

    load_vad()  # fail here, not at run time
    print(f"vad weights -> {DST}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
