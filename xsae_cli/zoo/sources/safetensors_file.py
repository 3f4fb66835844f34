"""One ``.safetensors`` file, and the safetensors reader every folder of shards uses.

The header is validated against the format and the file's size (:func:`core.io.check_safetensors`)
before anything is read. Tensors are streamed with one private memory map each.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xsae_cli.core.errors import XsaeError
from xsae_cli.core.io import check_safetensors
from xsae_cli.zoo.sources import Source, TensorInfo, register_source

#: safetensors dtype -> torch dtype name (the ones torch can hold; others are refused when streamed).
TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
}


class SafetensorsFile(Source):
    kind = "safetensors"
    describes = "a .safetensors file"
    suffixes = (".safetensors",)

    def read_index(self, file: Path) -> list[TensorInfo]:
        header = check_safetensors(file)
        return [
            TensorInfo(name, tuple(meta["shape"]), TORCH_DTYPES.get(meta["dtype"], meta["dtype"].lower()), file.name, meta["data_offsets"][1] - meta["data_offsets"][0])
            for name, meta in header.items()
            if name != "__metadata__"
        ]

    def read_weights(self, file: Path) -> Iterator[tuple[str, Any]]:
        """One private memory map per tensor, released when the consumer drops the tensor.

        ``safe_open`` maps the whole file, so every page ever touched stays resident until the file
        is closed: streaming a 7B model would grow RSS to the model's size. Mapping each tensor's
        byte range on its own keeps peak memory at about one tensor.
        """
        import mmap

        import torch

        header = check_safetensors(file)
        with open(file, "rb") as fh:
            data_start = 8 + int.from_bytes(fh.read(8), "little")
            items = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
            gran = mmap.ALLOCATIONGRANULARITY
            for name, meta in items:
                begin, end = meta["data_offsets"]
                dtype = getattr(torch, TORCH_DTYPES.get(meta["dtype"], "?"), None)
                if dtype is None:
                    raise XsaeError(f"{file}: tensor {name} has dtype {meta['dtype']}, which xsae cannot stream", "convert the file to float32/16 or bfloat16")
                shape = tuple(meta["shape"])
                if end == begin:
                    yield name, torch.empty(shape, dtype=dtype)
                    continue
                start = data_start + begin
                aligned = start - start % gran
                mm = mmap.mmap(fh.fileno(), length=end - begin + (start - aligned), offset=aligned, access=mmap.ACCESS_COPY)
                flat = torch.frombuffer(mm, dtype=dtype, offset=start - aligned, count=(end - begin) // dtype.itemsize)
                yield name, flat.view(shape)
                del flat, mm


register_source(SafetensorsFile())
