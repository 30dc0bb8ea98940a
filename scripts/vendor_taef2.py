"""Convert the TAEF2 .pth state dicts to safetensors under tccp/assets/taef2/.

Run once when (re)vendoring: `python scripts/vendor_taef2.py [SRC_DIR]`. The project
loads only the safetensors at run time, so no pickle is ever opened outside this
script (and here only with `weights_only=True`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SRC = ROOT.parent / "shared" / "assets" / "taef2"
DST = ROOT / "tccp" / "assets" / "taef2"

README = """# TAEF2 weights (vendored)

`encoder.safetensors` / `decoder.safetensors` are the tiny distilled autoencoder for
the FLUX.2 latent space ("TAEF2") by Ollin Boer Bohan, published in
https://github.com/madebyollin/taesd under the MIT License (see `LICENSE` here).

Converted unchanged from `taef2_encoder.pth` / `taef2_decoder.pth` by
`scripts/vendor_taef2.py` (float32 tensors, same names). The modules that load them
are `tccp/models/autoencoder.py`, written from the published layout.
"""


def main(src: Path = DEFAULT_SRC) -> None:
    DST.mkdir(parents=True, exist_ok=True)
    from tccp.models.autoencoder import make_decoder, make_encoder

    for name, make in (("encoder", make_encoder), ("decoder", make_decoder)):
        state = torch.load(src / f"taef2_{name}.pth", map_location="cpu", weights_only=True)
        state = {k: v.contiguous() for k, v in state.items()}
        make().load_state_dict(state, strict=True)  # fail here, not at run time
        save_file(state, str(DST / f"{name}.safetensors"), metadata={"source": f"taef2_{name}.pth"})
        print(f"{name}: {len(state)} tensors, {sum(v.numel() for v in state.values())} params")
    shutil.copyfile(src / "LICENSE", DST / "LICENSE")
    (DST / "README.md").write_text(README)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SRC)
