"""Pixel shards (`data.convert --format=pixels`): fixed-size records of raw pixels, each read by one `os.preadv`
straight into the batch array (in a grain worker, one `os.sendfile` into the shared memory that carries it).

A converted directory holds `manifest.json` ("encoding": "pixels", "shape": [N, N, 3], "resize": the short side
the pixels are at) and the shards it lists. A shard is a flat file of records of exactly N*N*3 bytes, uint8 HWC
RGB, with no headers: record j of a shard is bytes [j*N*N*3, (j+1)*N*N*3). The pixels are those of `--format=raw
--resize=R --center_crop=N` (every picture at short side R, the record its central N x N), so every record has
the one shape and scale the manifest names. Beside each shard, `<shard>.index.json` holds its records' labels
and names (the source files' relative paths), in order: {"labels": [...], "names": [...]}; its sha256 is in the
manifest with the shard's.

Why this layout: array_record's read copies each record into a new bytes object (~90 us for a 196 KB record, a
quarter of memcpy speed) before the pixels are copied into the batch; here the kernel copies a record from the
page cache into its row of the batch, once (`read_pixels_into`). Why a JSON sidecar: a few
dozen bytes a record beside ~200 KB of pixels, readable by any tool, never executed (no pickle), written and
checksummed with its shard; the labels are loaded on open, the names only read again to name a record.

File descriptors: one per shard, opened on a process's first read of it and never pickled (grain spawns its
workers and pickles the source into each, which opens its own). A descriptor inherited across fork keeps working
on both sides: preadv names its offset, so neither process moves a shared file position. A process holds at
most half its RLIMIT_NOFILE of them; past that the oldest is closed (many shards under a low limit still read,
at an open per read).

gs:// directories are refused: preadv needs a file system. Copy the shards to local disk or mount the bucket
(e.g. gcsfuse) and read them there.
"""

import functools
import json
import os
import resource

import numpy as np

from alexnet_jax import storage
from alexnet_jax.data import arrayrecord

ENCODING = "pixels"
SHARD_SUFFIX = ".pixels"
INDEX_SUFFIX = ".index.json"


def index_text(labels, names) -> str:
    """A shard's sidecar. ASCII JSON (non-ASCII names escaped), so its bytes and checksum do not depend on the
    locale's encoding."""
    return json.dumps({"labels": [int(label) for label in labels], "names": list(names)}, separators=(",", ":"))


@functools.cache
def _max_open() -> int:
    return max(1, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)


class PixelShardSource:
    """Records of a pixel-shard conversion, in manifest shard order. Shard sizes and sidecar record counts are
    checked against the manifest on open (cheap, catches truncated copies); `verify()` also checks the sha256
    of every shard and sidecar."""

    holds_pixels = True

    def __init__(self, path: str):
        self._fds = {}  # shard -> descriptor, this process's; first, so close() works whatever __init__ raises
        if storage.is_remote(path):
            raise ValueError(f"{path}: pixel shards are read with os.preadv, which needs a file system: copy the "
                             "shards to local disk or mount the bucket (e.g. gcsfuse) and use that path")
        self.root = path if os.path.isdir(path) else os.path.dirname(path)
        self.manifest = arrayrecord.read_manifest(path)
        if self.manifest.get("encoding") != ENCODING:
            raise ValueError(f"{self.root}: the {arrayrecord.MANIFEST} says encoding "
                             f"{self.manifest.get('encoding')!r}, not pixel shards ({ENCODING!r})")
        self.class_names = list(self.manifest["class_names"])
        self._shape = tuple(int(s) for s in self.manifest["shape"])
        self._short_side = int(self.manifest["resize"])
        self._record_bytes = int(np.prod(self._shape))
        self._paths, counts, labels = [], [], []
        for shard in self.manifest["shards"]:
            shard_path = os.path.join(self.root, shard["file"])
            try:
                size = os.stat(shard_path).st_size
            except FileNotFoundError:
                raise ValueError(f"{shard_path}: shard listed in {arrayrecord.MANIFEST} is missing") from None
            expected = shard["num_records"] * self._record_bytes
            if size != shard["bytes"] or size != expected:
                raise ValueError(f"{shard_path}: {size} bytes, the manifest says {shard['bytes']} ({shard['num_records']}"
                                 f" records of {self._record_bytes} bytes: {expected}) (truncated or replaced)")
            self._paths.append(shard_path)
            shard_labels = self._read_index(len(self._paths) - 1)["labels"]
            if len(shard_labels) != shard["num_records"]:
                raise ValueError(f"{shard_path}{INDEX_SUFFIX}: {len(shard_labels)} labels, the manifest says "
                                 f"{shard['num_records']} records")
            counts.append(shard["num_records"])
            labels.append(np.asarray(shard_labels, np.int32))
        self._starts = np.cumsum([0, *counts])  # global index of each shard's first record
        self._labels = np.concatenate(labels) if labels else np.zeros(0, np.int32)
        if len(self._labels) != self.manifest["num_examples"]:
            raise ValueError(f"{self.root}: {len(self._labels)} records, the manifest says "
                             f"{self.manifest['num_examples']}")

    def _read_index(self, shard: int) -> dict:
        path = self._paths[shard] + INDEX_SUFFIX
        try:
            with open(path, encoding="ascii") as f:
                return json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{path}: the labels and names of shard {self._paths[shard]} are missing") from None
        except ValueError as error:  # not JSON, or not ASCII: not the converter's sidecar
            raise ValueError(f"{path}: not a pixel-shard index ({error})") from None

    def __getstate__(self):
        return {**self.__dict__, "_fds": {}}  # descriptors are this process's: each worker opens its own

    def close(self, _close=os.close) -> None:
        """Closes this process's descriptors (reads reopen them). os.close is bound here: as __del__ this may run
        at interpreter exit, after the os module's globals are gone."""
        while self._fds:
            _close(self._fds.popitem()[1])

    __del__ = close

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= _max_open():
                os.close(self._fds.pop(next(iter(self._fds))))  # the oldest opened
            fd = self._fds[shard] = os.open(self._paths[shard], os.O_RDONLY)
        return fd

    def __len__(self):
        return len(self._labels)

    @property
    def uniform_pixels(self) -> tuple[int, int, int]:
        """(N, N, the --resize short side): every record is the central N x N of its picture at that scale."""
        return self._shape[0], self._shape[1], self._short_side

    def _indices(self, indices) -> np.ndarray:
        indices = np.asarray(indices, np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            bad = indices[(indices < 0) | (indices >= len(self))][0]
            raise IndexError(f"{self.root}: index {bad} out of range for {len(self)} records")
        return indices

    def _locations(self, indices: np.ndarray) -> list[tuple[int, int]]:
        """(shard, byte offset in it) of each of the checked `indices`."""
        shards = np.searchsorted(self._starts, indices, side="right") - 1
        return list(zip(shards.tolist(), ((indices - self._starts[shards]) * self._record_bytes).tolist()))

    def _short_read(self, shard: int, byte: int) -> ValueError:
        return ValueError(f"{self._paths[shard]}: short read at byte {byte}: the shard shrank after it was opened")

    def read_pixels_into(self, indices, out: np.ndarray) -> np.ndarray:
        """Writes record indices[k]'s pixels into out[k] (one preadv each, no other copy); returns the int32
        labels. `out` is a C-contiguous uint8 array of at least len(indices) rows of the records' shape."""
        indices = self._indices(indices)
        if (out.dtype != np.uint8 or out.shape[1:] != self._shape or len(out) < len(indices)
                or not out.flags.c_contiguous):
            raise ValueError(f"read_pixels_into needs a C-contiguous uint8 array of {len(indices)} x {self._shape}, "
                             f"got {out.dtype} {out.shape}")
        for k, (shard, offset) in enumerate(self._locations(indices)):
            if os.preadv(self._fd(shard), [out[k]], offset) != self._record_bytes:
                raise self._short_read(shard, offset)
        return self._labels[indices]

    def send_pixels_to(self, indices, fd: int) -> np.ndarray:
        """Writes records indices[0], indices[1], ... back to back at descriptor `fd`'s file position (os.sendfile:
        the kernel copies page cache to page cache and this process touches no pixel); returns the int32 labels.

        For a grain worker's batch in shared memory: written through a mapping, every fresh tmpfs page costs the
        worker a page fault, which made the hand-off cost twice the copy itself."""
        indices = self._indices(indices)
        for shard, offset in self._locations(indices):
            sent = 0
            while sent < self._record_bytes:  # sendfile may stop short (a signal); 0 is the end of the file
                count = os.sendfile(fd, self._fd(shard), offset + sent, self._record_bytes - sent)
                if count == 0:
                    raise self._short_read(shard, offset + sent)
                sent += count
        return self._labels[indices]

    def read_pixels(self, indices) -> dict:
        """A batch as the other pixel sources give it: the images are rows of one array read in place."""
        indices = np.asarray(indices, np.int64).reshape(-1)  # checked by read_pixels_into
        out = np.empty((len(indices), *self._shape), np.uint8)
        labels = self.read_pixels_into(indices, out)
        return {"images": list(out), "labels": labels, "short_sides": [self._short_side] * len(indices)}

    def read_record(self, index: int) -> dict:
        """{"image": uint8 HWC, "label", "index", "short_side": the picture's short side (its central region)}."""
        out = np.empty((1, *self._shape), np.uint8)
        label = self.read_pixels_into([index], out)[0]
        return {"image": out[0], "label": np.int32(label), "index": np.int64(index), "short_side": self._short_side}

    def __getitem__(self, index):
        record = self.read_record(index)
        return {"image": record["image"], "label": int(record["label"])}

    def name(self, index: int) -> str:
        index = int(self._indices([index])[0])
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return f"{self.root}[{index}] ({self._read_index(shard)['names'][index - self._starts[shard]]})"

    def verify(self) -> list[str]:
        """Shards and sidecars whose sha256 differs from the manifest (empty when all are intact)."""
        bad = []
        for path, shard in zip(self._paths, self.manifest["shards"]):
            for file, digest in ((path, shard["sha256"]), (path + INDEX_SUFFIX, shard["index_sha256"])):
                if arrayrecord.file_sha256(file) != digest:
                    bad.append(file)
        return bad
