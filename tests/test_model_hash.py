"""Model hashes name tensors, not files: the same weights saved twice hash equal, whatever the header order."""

import json
import struct

import torch
from safetensors.torch import save_file

from magic_align.config import ModelConfig
from magic_align.diffusion.loading import model_hash


def write_safetensors(path, tensors: dict, metadata: dict, reverse: bool) -> None:
    """A safetensors file written by hand, so the header's key order (and the metadata) can be chosen."""
    names = sorted(tensors, reverse=reverse)
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name in names:
        data = tensors[name].contiguous().numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.float16: "F16"}[tensors[name].dtype],
                        "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def tensors(scale: float = 1.0) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "unet.down.lora_A.weight": torch.randn(4, 8, generator=generator) * scale,
        "unet.down.lora_B.weight": torch.randn(8, 4, generator=generator),
        "unet.up.lora_A.weight": torch.randn(4, 8, generator=generator).half(),
    }


def test_same_tensors_in_another_header_order_and_metadata_hash_equal(tmp_path):
    first, second = tmp_path / "a" / "w.safetensors", tmp_path / "b" / "w.safetensors"
    first.parent.mkdir()
    second.parent.mkdir()
    write_safetensors(first, tensors(), {"format": "pt", "rank": "4"}, reverse=False)
    write_safetensors(second, tensors(), {"rank": "4", "format": "pt", "written": "later"}, reverse=True)
    assert first.read_bytes() != second.read_bytes()
    model = ModelConfig(source="tiny", resolution=64)
    assert model_hash(model, [first]) == model_hash(model, [second])

    third = tmp_path / "c" / "w.safetensors"
    third.parent.mkdir()
    save_file(tensors(), str(third), metadata={"format": "pt"})  # the library's own writer agrees too
    assert model_hash(model, [third]) == model_hash(model, [first])


def test_a_changed_tensor_changes_the_hash(tmp_path):
    model = ModelConfig(source="tiny", resolution=64)
    variants = {
        "same": tensors(),
        "changed": tensors(scale=1.001),
        "dtype": {name: value.half() for name, value in tensors().items()},
        "renamed": {name.replace("down", "mid"): value for name, value in tensors().items()},
        "reshaped": {name: value.reshape(-1) for name, value in tensors().items()},
    }
    hashes = {}
    for variant, weights in variants.items():
        path = tmp_path / variant / "w.safetensors"  # one file name: only the tensors differ
        path.parent.mkdir()
        write_safetensors(path, weights, {}, reverse=False)
        hashes[variant] = model_hash(model, [path])
    assert len(set(hashes.values())) == len(variants)


def test_a_damaged_weight_file_is_one_clear_error(tmp_path):
    """A file cut short (a crash while copying) or with a garbage header is refused by name, never hashed
    from whatever bytes are there and never a MemoryError or KeyError."""
    import pytest

    from magic_align.diffusion.loading import ModelLoadError

    whole = tmp_path / "whole.safetensors"
    write_safetensors(whole, tensors(), {}, reverse=False)
    entry = json.dumps({"x": {"dtype": "F32", "shape": [2]}}).encode()
    damaged = {
        "cut short": whole.read_bytes()[:-5],
        "header past the end": struct.pack("<Q", 2**62) + b"{}",
        "header length overflows": b"\xff" * 16,
        "header not an object": struct.pack("<Q", 2) + b"[]",
        "entry without offsets": struct.pack("<Q", len(entry)) + entry + bytes(8),
    }
    model = ModelConfig(source="tiny", resolution=64)
    for name, data in damaged.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
            model_hash(model, [path])
