"""grain pipelines: a source becomes this process's slice of each global batch, as uint8 numpy arrays.

The global batch sequence depends only on (seed, source, global batch size): grain shuffles the whole source
once per epoch, and global batch b is elements [b*G, (b+1)*G) of that stream. With P processes, each cuts the
stream into local batches of L = G/P elements, and process p takes local batches p, p+P, p+2P, ... -- so it
decodes only its own L images of every global batch, and the union over processes is the same whatever P is.
Because the stream is a pure function of the step, resuming at step s is just slicing at s.
"""

import dataclasses

import grain
from absl import flags
import numpy as np

from alexnet_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
    image_size: int
    resize_size: int

    def random_map(self, example, rng: np.random.Generator):
        image = transforms.random_crop(example["image"], rng, self.image_size, self.resize_size)
        return {"image": image, "label": np.int32(example["label"])}


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
    image_size: int
    resize_size: int

    def map(self, example):
        image = transforms.center_crop(example["image"], self.image_size, self.resize_size)
        return {"image": image, "label": np.int32(example["label"]), "mask": example["mask"]}


@dataclasses.dataclass(frozen=True)
class PaddedSource:
    """The source, lengthened to `length` by repeating its last element with mask=False."""

    source: object
    length: int

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        real = index < len(self.source)
        example = dict(self.source[index if real else len(self.source) - 1])
        example["mask"] = np.bool_(real)
        return example


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
    return global_batch_size // process_count


def _to_iterator(ds: grain.MapDataset, workers: int):
    if workers and not flags.FLAGS.is_parsed():
        # grain's worker start-up reads one of its absl flags; outside an absl app (pytest, notebooks) nobody
        # parsed them, so accept the defaults instead of failing.
        flags.FLAGS.mark_as_parsed()
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if workers else 2, prefetch_buffer_size=2))
    if workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it)


def train_dataset(source, *, global_batch_size: int, seed: int, image_size: int, resize_size: int,
                                    process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """An endless MapDataset of this process's local train batches; element b is its part of global batch b."""
    local = _local_batch_size(global_batch_size, process_count)
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds.random_map(TrainTransform(image_size, resize_size), seed=seed)
    return ds.batch(local, drop_remainder=True)[process_index::process_count]


def train_batches(source, *, start_step: int = 0, workers: int = 0, **kwargs):
    """Iterator over this process's local train batches, starting at global batch `start_step`."""
    return _to_iterator(train_dataset(source, **kwargs)[start_step:], workers)


def eval_dataset(source, *, global_batch_size: int, image_size: int, resize_size: int,
                                 process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Every eval example exactly once, in order; the last global batch is padded and `mask` marks real rows."""
    local = _local_batch_size(global_batch_size, process_count)
    num_batches = -(-len(source) // global_batch_size)
    ds = grain.MapDataset.source(PaddedSource(source, num_batches * global_batch_size))
    ds = ds.map(EvalTransform(image_size, resize_size))
    return ds.batch(local)[process_index::process_count]


def eval_batches(source, *, workers: int = 0, **kwargs):
    return _to_iterator(eval_dataset(source, **kwargs), workers)


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    return max(1, num_examples // global_batch_size)
