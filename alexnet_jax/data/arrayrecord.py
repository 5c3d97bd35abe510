"""Our converter's ArrayRecord shards (data/convert.py) as a random-access source.

A converted directory holds `manifest.json` and the shards it lists. Each record is

    b"AXJ1" | uint32 little-endian header length | UTF-8 JSON header | payload

with header {"label": int, "name": relative source path, "format": "jpeg" | "raw", "shape": [h, w, 3] (raw),
"short_side": int (raw records holding only the central region of a picture: the picture's short side)};
the payload is the re-encoded JPEG or the raw uint8 HWC pixels. A self-describing header rather than pickle:
reading a shard never executes anything it contains.

Shards are written with `group_size:1`, so reading record i touches only record i (grain's global shuffle is
random access); the source opens them through array_record's `ArrayRecordDataSource` (what
`grain.sources.ArrayRecordDataSource` wraps, without importing jax -- the converter and its workers stay light),
which reopens its readers lazily after being pickled into grain worker processes. The directory may be a gs://
URL: array_record's C++ reader opens gs:// objects itself (google-cloud-cpp, with the machine's default
credentials) and reads each record by a ranged request; the manifest is read through epath.
"""

import hashlib
import json
import os
import struct

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from etils import epath

from alexnet_jax.data import decode

MAGIC = b"AXJ1"
MANIFEST = "manifest.json"
WRITER_OPTIONS = "group_size:1,uncompressed"  # JPEG does not compress; random reads must not inflate a group
FORMATS = ("jpeg", "raw")


def encode_record(label: int, name: str, payload: bytes, fmt: str, shape=None, short_side: int | None = None) -> bytes:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    header = {"label": int(label), "name": name, "format": fmt}
    if fmt == "raw":
        header["shape"] = [int(s) for s in shape]
        if short_side is not None:
            header["short_side"] = int(short_side)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes + payload


def decode_record(record: bytes) -> tuple[dict, memoryview]:
    """(header, payload) of one record; ValueError if it is not one of ours."""
    if record[:4] != MAGIC:
        raise ValueError("not an alexnet_jax ArrayRecord record (bad magic)")
    (length,) = struct.unpack_from("<I", record, 4)
    header = json.loads(bytes(record[8:8 + length]))
    return header, memoryview(record)[8 + length:]


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: str) -> dict:
    """The manifest of a converted directory (or the manifest file itself)."""
    manifest_path = epath.Path(path) / MANIFEST if epath.Path(path).is_dir() else epath.Path(path)
    if not manifest_path.is_file():
        raise ValueError(f"{path}: no {MANIFEST} (not a finished conversion; rerun data.convert to finish it)")
    return json.loads(manifest_path.read_text())


class ArrayRecordSource:
    """Records of a converted directory, in manifest shard order. The shard sizes are checked against the
    manifest on open (cheap, catches truncated copies); `verify()` also checks the sha256 of every shard."""

    def __init__(self, path: str):
        self.root = path if epath.Path(path).is_dir() else os.fspath(epath.Path(path).parent)
        self.manifest = read_manifest(path)
        self.class_names = list(self.manifest["class_names"])
        self._paths = []
        for shard in self.manifest["shards"]:
            shard_path = os.path.join(self.root, shard["file"])  # posix joins keep a gs:// URL intact
            try:
                size = epath.Path(shard_path).stat().length
            except FileNotFoundError:
                raise ValueError(f"{shard_path}: shard listed in {MANIFEST} is missing") from None
            if size != shard["bytes"]:
                raise ValueError(f"{shard_path}: {size} bytes, the manifest says {shard['bytes']} "
                                 "(truncated or replaced)")
            self._paths.append(shard_path)
        self._records = ArrayRecordDataSource(self._paths)
        if len(self._records) != self.manifest["num_examples"]:
            raise ValueError(f"{self.root}: {len(self._records)} records, the manifest says "
                             f"{self.manifest['num_examples']}")

    def __len__(self):
        return len(self._records)

    @property
    def holds_pixels(self) -> bool:
        return self.manifest.get("encoding") == "raw"

    @property
    def uniform_pixels(self) -> tuple[int, int, int] | None:
        """(N, N, the --resize short side) for raw records converted with --resize and --center_crop=N, whose
        manifest says every record is N x N ("shape"); else None: records keep their pictures' shapes."""
        shape, short_side = self.manifest.get("shape"), self.manifest.get("resize")
        if not (self.holds_pixels and shape and short_side):
            return None
        return shape[0], shape[1], short_side

    def read_pixels(self, indices) -> dict:
        """A batch of raw records in one read (array_record's batched read): the pixels as views of the read
        bytes, no copy."""
        records = self._records.__getitems__([int(i) for i in indices])
        images, labels, short_sides = [], np.empty(len(records), np.int32), []
        for k, record in enumerate(records):
            header, payload = decode_record(record)
            if header["format"] != "raw":
                raise ValueError(f"{self.name(int(indices[k]))}: a {header['format']} record in raw shards")
            images.append(np.frombuffer(payload, np.uint8).reshape(header["shape"]))
            labels[k] = header["label"]
            short_sides.append(header.get("short_side"))
        return {"images": images, "labels": labels, "short_sides": short_sides}

    def read_record(self, index: int) -> dict:
        """{"encoded": JPEG bytes} or {"image": uint8 HWC} for raw shards (and "short_side" when the pixels are
        the central region of a picture with that short side), plus "label" and "index"."""
        index = int(index)
        header, payload = decode_record(self._records[index])
        example = {"label": np.int32(header["label"]), "index": np.int64(index)}
        if header["format"] == "raw":
            example["image"] = np.frombuffer(payload, np.uint8).reshape(header["shape"])
            if "short_side" in header:
                example["short_side"] = int(header["short_side"])
        else:
            example["encoded"] = bytes(payload)
        return example

    def __getitem__(self, index):
        record = self.read_record(index)
        image = record["image"] if "image" in record else decode.decode(record["encoded"])
        return {"image": image, "label": int(record["label"])}

    def name(self, index: int) -> str:
        header, _ = decode_record(self._records[int(index)])
        return f"{self.root}[{index}] ({header['name']})"

    def verify(self) -> list[str]:
        """Shards whose sha256 differs from the manifest (empty when all are intact)."""
        return [p for p, s in zip(self._paths, self.manifest["shards"]) if file_sha256(p) != s["sha256"]]
