"""grain pipelines: a source becomes this process's slice of each global batch, as uint8 numpy arrays.

The global batch sequence depends only on (seed, source, global batch size): grain shuffles the whole source
once per epoch, and global batch b is elements [b*G, (b+1)*G) of that stream. With P processes, each cuts the
stream into local batches of L = G/P elements, and process p takes local batches p, p+P, p+2P, ... -- so it
decodes only its own L images of every global batch, and the union over processes is the same whatever P is.
Because the stream is a pure function of the step, resuming at step s is just slicing at s.

Sources that hold pixels (digits, synthetic, raw ArrayRecord, pixel shards) are read a whole local batch per grain
element in training (`BatchCrops`: one batched read, the crops cut straight into the batch array; eval and the
statistics set go through the per-example array transforms). Under data.device_crops the stored arrays travel whole
(`StoredPixels`) and the device cuts the train crops and, at the crop's scale, the eval views. Sources of encoded
images (ImageFolder, flat val, JPEG ArrayRecord: they have `read_record`) hand the transform the file's bytes, and
the transform decodes only what the crop needs (data/decode.py) -- in the grain worker processes.

Unreadable files (empty, truncated, not an image, over the pixel limit) never crash a run and never train with a
wrong label. In a random-access pipeline an element cannot just vanish (batch shapes, and the same global batches
whatever the process count), so:
- train: the element is replaced by another example drawn from the element's own random stream -- so it is the
  same substitute in every run and on every process count -- with its own, correct label;
- eval: the element keeps its place with mask=False, so it is left out of every metric (eval_examples drops).
Either way the batch carries the bad file's index to this process, which logs one warning line per bad file
naming it, and a count per epoch (train) or at the end of the pass (eval); the iterators' `bad_files` attribute
holds the running total.
"""

import contextlib
import dataclasses
import functools
import gc
import hashlib
import os
import secrets
import signal
import threading
import time

from multiprocessing import resource_tracker

import grain
import numpy as np
from absl import flags, logging

from alexnet_jax.data import decode, draws, transforms

try:  # grain's shared-memory array, not exported: a worker's batch built in one is handed over by name, uncopied
    from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
except ImportError:  # moved in another grain release: workers' batches are copied by grain, as for other sources
    SharedMemoryArray = None

AUGMENTATIONS = ("alexnet", "inception")
EVAL_VIEW = "eval"  # TrainTransform's view for the BatchNorm-statistics set: the eval crop, with substitutes
EVAL_CROPS = (1, 10)
MAX_SUBSTITUTES = 16  # a train element gives up (and the run stops) only if this many draws in a row are bad
PARENT_POLL_S = 0.2  # how often a grain worker checks that the trainer is still alive


def _train_box_fn(augment: str, image_size: int, resize_size: int, rng: np.random.Generator):
    if augment == EVAL_VIEW:
        return lambda w, h: transforms.center_crop_box(w, h, image_size, resize_size)
    if augment == "inception":
        return lambda w, h: transforms.inception_crop_box(w, h, rng)
    return lambda w, h: transforms.alexnet_crop_box(w, h, rng, image_size, resize_size)


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
    image_size: int
    resize_size: int
    augment: str = "alexnet"
    records: object = None  # the record view, to draw substitutes for unreadable files

    def _view(self, example, rng: np.random.Generator) -> np.ndarray:
        if "encoded" in example:
            box = _train_box_fn(self.augment, self.image_size, self.resize_size, rng)
            return decode.decode_crop(example["encoded"], box, (self.image_size, self.image_size))
        if self.augment == EVAL_VIEW:
            return transforms.center_crop(example["image"], self.image_size, self.resize_size,
                                          example.get("short_side"))
        if self.augment == "inception":
            return transforms.random_resized_crop(example["image"], rng, self.image_size)
        return transforms.random_crop(example["image"], rng, self.image_size, self.resize_size,
                                      example.get("short_side"))

    def random_map(self, example, rng: np.random.Generator):
        if "encoded" not in example:
            return {"image": self._view(example, rng), "label": np.int32(example["label"])}
        bad_index = -1
        for _ in range(MAX_SUBSTITUTES + 1):
            try:
                image = self._view(example, rng)
                return {"image": image, "label": np.int32(example["label"]), "bad_index": np.int64(bad_index)}
            except decode.BadImageError as error:
                if bad_index < 0:
                    bad_index = int(example["index"])  # named by the consuming process, see BatchIterator
                else:  # the substitute was bad too: rare enough to log here, in the worker
                    logging.warning("unreadable image, drawn to replace another: %s: %s",
                                    self.records.source.name(int(example["index"])),
                                    example.get("read_error", error))
                example = self.records[int(rng.integers(len(self.records)))]
        raise RuntimeError(f"{MAX_SUBSTITUTES + 1} unreadable images in a row (first at index {bad_index}): "
                           "is the data path right?")


@dataclasses.dataclass(frozen=True)
class StreamIndex(grain.transforms.MapWithIndex):
    """An element of the shuffled index stream as (its stream position, the source index it names)."""

    def map_with_index(self, position: int, index):
        return {"position": np.int64(position), "index": np.int64(index)}


@functools.lru_cache(maxsize=8)
def _philox_key(seed: int) -> np.ndarray:
    return draws.philox_key(seed)


@dataclasses.dataclass(frozen=True)
class BatchCrops(grain.transforms.Map):
    """The alexnet train view of a local batch of a pixel source, read in one call (`source.read_pixels`).

    Gives the same pixels TrainTransform gives each element: the offsets are the draws of the generator grain's
    random_map would hand that stream position (data/draws.py), so the batches still depend only on the seed and
    the global batch index. A stored array already at the crop's scale (its short side, or its picture's, is
    resize_size) is cut by a slice, copied once from the read buffer into the batch array; others (and the rare
    offsets numpy would redraw) go through transforms.random_crop with that generator."""

    source: object
    image_size: int
    resize_size: int
    seed: int

    def map(self, batch):
        positions = batch["position"]
        read = self.source.read_pixels(batch["index"])
        images, size, resize = read["images"], self.image_size, self.resize_size
        hw = np.array([image.shape[:2] for image in images], np.int64).reshape(-1, 2)
        h, w = hw[:, 0], hw[:, 1]
        # transforms._resized_shape, vectorised with the same float operations in the same order
        whole = np.array([s is None for s in read["short_sides"]])
        short = np.where(whole, np.minimum(h, w), [s or 1 for s in read["short_sides"]])
        scale = resize / short
        rw, rh = np.round(w * scale).astype(np.int64), np.round(h * scale).astype(np.int64)
        rw, rh = np.where(whole, np.maximum(rw, resize), rw), np.where(whole, np.maximum(rh, resize), rh)
        key = _philox_key(self.seed)
        top, left, exact = draws.crop_offsets(key, positions, rh - size + 1, rw - size + 1)
        cut = exact & (rw == w) & (rh == h)
        out = np.empty((len(images), size, size, 3), np.uint8)
        for k, image in enumerate(images):
            if cut[k]:
                out[k] = image[top[k]:top[k] + size, left[k]:left[k] + size]
            else:
                out[k] = transforms.random_crop(image, draws.element_generator(key, positions[k]), size, resize,
                                                read["short_sides"][k])
        return {"image": out, "label": np.asarray(read["labels"], np.int32)}


@dataclasses.dataclass(frozen=True)
class StoredPixels(grain.transforms.Map):
    """A local batch of a pixel source's stored arrays, whole, for the device to crop (data.device_crops).

    One batched read, one copy into the batch array; "position" is each example's global stream position
    (uint32: it wraps after 2**32 examples), which the step's crop offsets are drawn from
    (transforms.device_crop_offsets). Every array must be the source's `uniform_pixels` shape at its scale (the
    converter's manifest vouches for it); a record that is not stops the run naming it, since cutting it to that
    shape here would change which crops it can give. A source of one fixed shape by construction may offer
    `read_pixels_into(indices, out) -> int32 labels`, which writes the pixels straight into the batch array, and
    `send_pixels_to(indices, fd)`, which has the kernel write them into a grain worker's shared batch."""

    source: object
    shape: tuple  # (height, width, short side of the scale the pixels are at)

    def map(self, batch):
        indices = batch["index"]
        height, width, short_side = self.shape
        shape = (len(indices), height, width, 3)
        if _batches_leave_by_name and hasattr(self.source, "send_pixels_to"):
            return self._batch(*_sent_to_shared_memory(self.source, indices, shape), batch)
        out = np.empty(shape, np.uint8)
        if hasattr(self.source, "read_pixels_into"):  # a fixed-shape layout reads straight into the batch
            return self._batch(out, self.source.read_pixels_into(indices, out), batch)
        read = self.source.read_pixels(indices)
        images = read["images"]
        try:
            np.stack(images, out=out)
            sides = read["short_sides"]
            if any(side not in (None, short_side) for side in sides):
                raise ValueError
        except ValueError:
            k = next(k for k, image in enumerate(images) if image.shape != (height, width, 3)
                     or read["short_sides"][k] not in (None, short_side))
            name = self.source.name(int(indices[k])) if hasattr(self.source, "name") else f"example {indices[k]}"
            raise ValueError(
                f"data.device_crops: {name} is stored {images[k].shape[1]}x{images[k].shape[0]} at short side "
                f"{read['short_sides'][k]}, not {width}x{height} at {short_side} as the records' manifest says: "
                "convert them again, or set data.device_crops=False") from None
        return self._batch(out, read["labels"], batch)

    @staticmethod
    def _batch(images, labels, batch) -> dict:
        """The shipped batch: train batches carry each example's stream position, eval batches their mask."""
        out = {"image": images, "label": np.asarray(labels, np.int32)}
        if "position" in batch:
            out["position"] = batch["position"].astype(np.uint32)
        if "mask" in batch:
            out["mask"] = batch["mask"]
        return out


def _sent_to_shared_memory(source, indices, shape) -> tuple[np.ndarray, np.ndarray]:
    """A grain worker's batch of a pixel-shard source, written by the kernel into a new block of shared memory that
    grain then hands the trainer by name (a SharedMemoryArray leaf is not copied again); (images, labels).

    The alternative, reading into this process's memory and letting grain copy it into a new block, writes every
    fresh tmpfs page through a mapping, a page fault each: on a 64 x 256 x 256 x 3 batch that hand-off cost
    about twice what sendfile does (data/pixelshards.py, send_pixels_to)."""
    images = SharedMemoryArray(shape, np.uint8)
    try:
        fd = os.open(os.path.join(SHM_DIR, images.shm.name), os.O_WRONLY)
        try:
            labels = source.send_pixels_to(indices, fd)
        finally:
            os.close(fd)
    except BaseException:
        images.shm.unlink()  # no reader will ever free it; the mapping goes with `images`
        raise
    return images, labels


def device_crop_problem(source, data_config) -> str | None:
    """Why data.device_crops cannot train on `source` (the train split), or None. The device crops straight from
    the stored arrays, so they must be pixels of one shape; the alexnet crop is a slice, so they must also be at
    the crop's scale (what BatchCrops cuts by a slice) and hold the crop. The inception crop resamples a box of the
    whole stored array, as the host's does whatever the array's scale, so any size will do. Decided from what the
    source knows (its shape, a raw ArrayRecord manifest)."""
    if not data_config.get("device_crops", False):
        return None
    augment, name = data_config["augment"], data_config["source"]
    size, resize = int(data_config["image_size"]), int(data_config["resize_size"])
    convert = f"python -m alexnet_jax.data.convert --format=raw --resize={resize} --center_crop={resize} ..."
    if not getattr(source, "holds_pixels", False):
        return (f"data.device_crops needs stored pixels, and data.source={name} holds encoded images (decoded on "
                f"the host): convert them to raw records with {convert}")
    layout = getattr(source, "uniform_pixels", None)
    if layout is None:
        return ("data.device_crops needs records of one stored shape, and data.train_path holds raw records of each"
                " picture's own shape (converted without --center_crop, or by a version that kept pictures smaller than"
                " --resize at their size); they are refused rather than cut to one "
                f"window on the host, which would change which crops can be drawn: convert with {convert}")
    height, width, short_side = layout
    if augment == "inception":
        return None
    if short_side != resize:
        fix = ("set data.resize_size=data.image_size (each crop is then the whole image)"
               if name in ("digits", "synthetic") else f"set data.resize_size={short_side} or convert with {convert}")
        return (f"data.device_crops needs the stored pixels at the crop's scale, and data.source={name} stores them "
                f"at short side {short_side}, not data.resize_size={resize}: {fix}")
    if min(height, width) < size:
        return (f"data.device_crops: the stored {width}x{height} pixels are smaller than the {size} px crop: "
                f"convert with {convert}")
    return None


def device_eval_problem(source, data_config) -> str | None:
    """Why the eval view of `source` cannot be cut on the device under data.device_crops, or None. The host's
    eval view is the central crop at short side data.resize_size; of stored pixels at that scale it is a
    central slice, which the eval step cuts from the whole stored array (train.eval_images); at any other
    scale it is a resample, which stays on the host."""
    if not data_config.get("device_crops", False):
        return "data.device_crops is off"
    if not getattr(source, "holds_pixels", False):
        return "the source holds encoded images (decoded on the host)"
    layout = getattr(source, "uniform_pixels", None)
    if layout is None:
        return "the records have each picture's own shape"
    height, width, short_side = layout
    resize = int(data_config["resize_size"])
    view = resize if int(data_config.get("eval_crops", 1)) == 10 else int(data_config["image_size"])
    if short_side != resize:
        return f"the pixels are stored at short side {short_side}, not data.resize_size={resize}"
    if min(height, width) < view or (view == resize and height != width):
        return f"the stored {width}x{height} pixels do not hold the central {view} px square"
    return None


def eval_views_on_device(source, data_config, purpose: str) -> bool:
    """Whether the eval-view batches of `source` (for `purpose`) ship its stored pixels whole for the device to
    cut; under data.device_crops says once why not, when not."""
    problem = device_eval_problem(source, data_config)
    if data_config.get("device_crops", False):
        logging.info("data.device_crops: %s views are cut on the %s", purpose,
                     f"host: {problem}" if problem else "device from the stored pixels")
    return problem is None


@dataclasses.dataclass(frozen=True)
class EvalIndex(grain.transforms.Map):
    """Element i of a split lengthened to whole global batches: its source index and whether it is real (the
    padding repeats the last example with mask=False, as PaddedSource does)."""

    length: int

    def map(self, i):
        return {"index": np.int64(min(i, self.length - 1)), "mask": np.bool_(i < self.length)}


def _source_index(i):
    return {"index": np.int64(i)}


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
    image_size: int
    resize_size: int
    eval_crops: int = 1  # 10: ship the central resize_size square; the device cuts the ten views

    def map(self, example):
        crop = self.resize_size if self.eval_crops == 10 else self.image_size
        label, mask = np.int32(example["label"]), example["mask"]
        if "encoded" not in example:
            image = transforms.center_crop(example["image"], crop, self.resize_size, example.get("short_side"))
            return {"image": image, "label": label, "mask": mask}
        bad_index = -1
        try:
            image = eval_view(example["encoded"], self.image_size, self.resize_size, self.eval_crops)
        except decode.BadImageError:
            image = np.zeros((crop, crop, 3), np.uint8)
            bad_index = int(example["index"]) if mask else -1  # padding repeats are not reported twice
            mask = np.bool_(False)
        return {"image": image, "label": label, "mask": mask, "bad_index": np.int64(bad_index)}


def _eval_crop(image_size: int, resize_size: int, eval_crops: int):
    """(box plan, output size) of the eval view: the central crop of the picture with its short side at
    resize_size; the crop is the resize_size square itself for ten-crop eval (the device cuts the views)."""
    crop = resize_size if eval_crops == 10 else image_size
    return (lambda w, h: transforms.center_crop_box(w, h, crop, resize_size)), (crop, crop)


def eval_view(data: bytes, image_size: int, resize_size: int, eval_crops: int = 1) -> np.ndarray:
    """The host view the eval pipeline ships for one encoded image (predict uses it, so a prediction sees
    exactly what evaluation saw). Raises decode.BadImageError (a ValueError)."""
    plan, size = _eval_crop(image_size, resize_size, eval_crops)
    return decode.decode_crop(data, plan, size)


def eval_view_of_picture(image, image_size: int, resize_size: int, eval_crops: int = 1) -> np.ndarray:
    """The same view of a picture already decoded (a PIL image, taken as it is: upright, full resolution)."""
    plan, size = _eval_crop(image_size, resize_size, eval_crops)
    return decode.resample_box(image, plan(*image.size), size)


@dataclasses.dataclass(frozen=True)
class RecordView:
    """A grain source over `source.read_record`: undecoded elements for sources of encoded images."""

    source: object

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        return self.source.read_record(index)


@dataclasses.dataclass(frozen=True)
class Subset:
    """The elements of `source` at `indices`, in that order."""

    source: object
    indices: tuple

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.source[self.indices[index]]


def _records(source):
    return RecordView(source) if hasattr(source, "read_record") else source


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


SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory and named semaphores
# Set in grain's worker processes (_init_worker) where their batches can be built in the shared memory that
# carries them (grain's SharedMemoryArray importable, a SHM_DIR to open the block by name): _sent_to_shared_memory.
_batches_leave_by_name = False
_shm_tag = None  # this run's name prefix, set by release_orphaned_shared_memory


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process `pid` (with the pid, it names one process, whatever reuses the pid);
    None if there is no such process or it is a zombie, '' if /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        return ""
    return None if fields[0] in ("Z", "X") else fields[19]


def _workdir_key(workdir: str) -> str:
    name = workdir if "://" in workdir else os.path.abspath(workdir)
    return hashlib.sha256(name.encode()).hexdigest()[:12]


def _use_tag(tag: str) -> None:
    """Names this process's new shared-memory blocks and multiprocessing semaphores `<tag><random>`.

    grain gives its blocks anonymous random names (as does multiprocessing its semaphores, or loky's
    `loky-<pid>-` once sklearn's joblib is imported), so a dead run's leftovers could not be told from a live
    run's. Python has no public way to choose them, so this sets the two module-level name makers the standard
    library uses at each creation; if a Python release renames them, names stay anonymous and only the cleanup
    of killed runs is lost."""
    from multiprocessing import shared_memory, synchronize

    if hasattr(shared_memory, "_make_filename"):
        shared_memory._make_filename = lambda: f"/{tag}{secrets.token_hex(8)}"
    if hasattr(synchronize.SemLock, "_make_name"):
        synchronize.SemLock._make_name = staticmethod(lambda: f"/{tag}s{secrets.token_hex(8)}")


def _remove_tagged(prefix: str, keep) -> dict:
    """Unlinks the blocks and semaphores in SHM_DIR whose names start with `prefix` + '<pid>.<start>.', except
    those `keep(pid, start)` accepts; returns {pid: number removed}."""
    removed = {}
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        bare = name[4:] if name.startswith("sem.") else name
        if not bare.startswith(prefix):
            continue
        pid, _, rest = bare[len(prefix):].partition(".")
        start, dot, _ = rest.partition(".")
        if not (pid.isdigit() and dot) or keep(int(pid), start):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:  # freed meanwhile by its reader
            continue
        except OSError as error:
            logging.warning("cannot remove %s, left by a killed run: %s", os.path.join(SHM_DIR, name),
                            error.strerror)
            continue
        removed[int(pid)] = removed.get(int(pid), 0) + 1
    return removed


def _still_running(pid: int, start: str) -> bool:
    now = _process_start(pid)
    return now is not None and (now == start or "" in (now, start) or start == "0")  # unknown: keep


def release_orphaned_shared_memory(workdir: str) -> None:
    """Frees the shared memory that killed trainers of `workdir` left in /dev/shm, and names this process's from
    now on so that a later run can do the same for it.

    A trainer killed by SIGKILL or the OOM killer cannot free the batches its grain workers had in flight (and the
    workers, see _init_worker, free them only if they outlive it). Every block and semaphore of this process and
    its workers is named `ajx.<workdir key>.<pid>.<start time>.<random>`; a run frees those of every pid of its
    workdir that is no longer the process that made them. Live runs keep theirs. Linux only (elsewhere there is
    no /dev/shm to list, and names this long would not fit)."""
    global _shm_tag
    if not os.path.isdir(SHM_DIR):
        return
    prefix = f"ajx.{_workdir_key(workdir)}."
    removed = _remove_tagged(prefix, keep=_still_running)
    for pid, count in sorted(removed.items()):
        logging.warning("freed %d shared-memory block(s) in %s left by a killed run of this workdir (pid %d)",
                        count, SHM_DIR, pid)
    pid = os.getpid()
    _shm_tag = f"{prefix}{pid}.{_process_start(pid) or 0}."
    _use_tag(_shm_tag)


def _watch_parent(parent: int, tag: str | None) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    # The trainer is gone, so every block of its run is garbage, in flight or not: free them now rather than at
    # the next run, then go.
    if tag:
        prefix = tag.rsplit(".", 3)[0] + "."  # 'ajx.<workdir key>.' of 'ajx.<workdir key>.<pid>.<start>.'
        _remove_tagged(prefix, keep=lambda pid, start: f"{prefix}{pid}.{start}." != tag)
    os._exit(1)


def _init_worker(parent: int, tag: str | None, worker_index: int, worker_count: int) -> None:
    """Runs first in each grain worker.

    Ctrl-C (and a scheduler's SIGTERM to the whole process group, e.g. scancel) reaches the workers too, and the
    training process alone decides what it means (checkpoint, then stop, then close the workers); a worker that
    died of it would fail the last batches before the checkpoint, print a traceback and leak its shared memory.

    A worker must not outlive the trainer (SIGKILL, the OOM killer): nothing would ever read its batches, and it
    would keep its memory and its shared memory for good. A thread watches the parent pid instead of a
    parent-death signal (prctl PR_SET_PDEATHSIG), because that signal fires when the *thread* that started the
    process ends, and grain starts workers from its prefetch threads, which come and go while the trainer lives.
    `parent` is the trainer's pid as the trainer saw it, so a trainer that died before this ran is noticed too."""
    global _batches_leave_by_name
    del worker_index, worker_count
    _batches_leave_by_name = SharedMemoryArray is not None and os.path.isdir(SHM_DIR)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if tag:
        _use_tag(tag)
    threading.Thread(target=_watch_parent, args=(parent, tag), name="alexnet_jax-parent-watch", daemon=True).start()


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def interrupts_held():
    """Blocks SIGINT and SIGTERM in this thread for the duration: they stay pending (or another thread takes
    them), never lost.

    Grain starts its worker processes from the thread that asks for the next batch, or from threads that one
    creates, and a process starts with the signal mask of the thread that forked it. A worker started with the
    two signals blocked cannot be killed by a Ctrl-C typed while it is still importing, before _init_worker makes
    it ignore them (one typed 1 s into the first eval used to kill the starting eval workers: C++ 'terminate
    called' tracebacks, then a crashed run without a checkpoint). Threads inherit the mask too, so grain's
    threads created meanwhile, and the workers they start later, are covered as well."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


AUTO_WORKERS = -1  # data.workers=-1: the count is chosen per pipeline, see auto_workers
SMALL_PIPELINE_IMAGES = 2048
MAX_AUTO_WORKERS = 32
_announced: set[str] = set()  # auto counts logged so far: each is said once per process


def auto_workers(*, cores: int, images: int, batch_size: int, step_on_host: bool = False) -> tuple[int, str]:
    """(worker processes, why) for data.workers=-1, from this process's usable `cores` and the size of the job:
    `images` this process will decode in `batch_size` batches (its part of a run's training stream, or of one
    pass over an eval or statistics set).

    A worker takes seconds to start (it imports the project) and then competes with the trainer for cores, while
    in this process two threads decode ~300 JPEGs per second per core: under SMALL_PIPELINE_IMAGES images no
    worker pays for its start. Two cores stay with the training loop and XLA's host threads; on the CPU backend
    the step itself runs on these cores, so half of them do. One worker without threads is slower than the two
    decoding threads this process uses without workers, so it is none or at least two. A worker builds whole
    batches, so more workers than batches would idle; past MAX_AUTO_WORKERS, add data.worker_threads instead
    (each process holds its own copy of the file list)."""
    if images < SMALL_PIPELINE_IMAGES:
        return 0, (f"{images} images to decode, under {SMALL_PIPELINE_IMAGES}: decoding them here is quicker than "
                   "starting worker processes")
    reserved = max(2, cores // 2) if step_on_host else 2
    keeps = f"{cores} usable cores, {reserved} kept for the training loop and XLA" + (
        " (the step runs on the CPU)" if step_on_host else "")
    spare = cores - reserved
    if spare < 2:
        return 0, f"{keeps}: too few left for worker processes"
    batches = -(-images // max(1, batch_size))
    count = min(spare, batches, MAX_AUTO_WORKERS)
    bound = ("one per batch" if count == batches < spare else
             f"at most {MAX_AUTO_WORKERS}" if count == MAX_AUTO_WORKERS < spare else "one per spare core")
    return count, f"{keeps}, {bound}, for {images} images"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, and a container's CPU quota (cgroup v2) below it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def feed_options(data_config, *, purpose: str, images: int, global_batch_size: int, process_count: int = 1) -> dict:
    """The pipeline's process/thread/prefetch settings from a config's data section, as keyword arguments of
    train_batches, eval_batches, eval_passes and RepeatedPasses. data.workers=-1 is resolved here: auto_workers
    for this process's share of `images` (all processes' images of the run's training stream, or of one pass of
    an eval or statistics set), logged in one info line naming the `purpose` (e.g. "training", "eval"), once."""
    workers = int(data_config.workers)
    if workers == AUTO_WORKERS:
        import jax  # only the trainer resolves it, with jax loaded; the workers import this module without it

        workers, why = auto_workers(cores=usable_cores(), images=int(images) // process_count,
                                    batch_size=max(1, global_batch_size // process_count),
                                    step_on_host=jax.default_backend() == "cpu")
        line = f"data.workers=-1 (auto): {workers} worker process(es) for {purpose}: {why}"
        if line not in _announced:
            _announced.add(line)
            logging.info("%s", line)
    return {"workers": workers, "worker_threads": int(data_config.get("worker_threads", 0)),
            "worker_buffer": int(data_config.get("worker_buffer", 1))}


def _to_iterator(ds: grain.MapDataset, workers: int, worker_threads: int = 0, worker_buffer: int = 1):
    """Elements decode in `workers` processes (none: 2 threads here), each reading with `worker_threads` threads
    (0: one element at a time; decoding releases the GIL, so threads use more cores per process) and keeping up
    to `worker_buffer` finished batches ready."""
    if workers and not flags.FLAGS.is_parsed():
        # grain's worker start-up reads one of its absl flags; outside an absl app (pytest, notebooks) nobody
        # parsed them, so accept the defaults instead of failing.
        flags.FLAGS.mark_as_parsed()
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=worker_threads if workers else 2, prefetch_buffer_size=2))
    if workers:
        if _shm_tag:  # again: importing sklearn (digits) since then re-sets the semaphore names, see _use_tag
            _use_tag(_shm_tag)
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=worker_buffer),
                            worker_init_fn=functools.partial(_init_worker, os.getpid(), _shm_tag))
        # multiprocessing's resource tracker, started on first use, *unblocks* SIGINT and SIGTERM in the thread that
        # starts it (a grain thread that would then start workers unguarded): start it here, outside the guard.
        resource_tracker.ensure_running()
    with interrupts_held():
        return iter(it)


def describe_bad_file(source, index: int) -> str:
    """'<file>: <why it cannot be decoded>' for element `index` of a source of encoded images."""
    try:
        record = source.read_record(index)
        why = record.get("read_error") or decode.check(record.get("encoded", b"x")) or (
            "failed to decode in the pipeline but decodes when read again (a transient read error?)")
    except Exception as error:  # reading it again failed too: say so rather than lose the name
        why = str(error)
    return f"{source.name(index)}: {why}"


def _finish_shared_memory_release() -> None:
    """Frees the batches already consumed and waits until their shared memory is unlinked.

    A worker batch's shared memory is unlinked only when its arrays are freed, and grain does that on a
    background thread (asynchronous deletion). Batches the caller has let go of can still sit in reference cycles
    (iterator and exception-traceback frames) that nothing collects before exit, and a process that exits right
    after its last eval leaves deletion requests queued; either way multiprocessing's resource tracker reports the
    blocks as leaked at shutdown. So collect the cycles, then wait for the queue: grain has no public call for
    it, but its deletion pool is one thread working in order, so a no-op task queued behind the pending ones
    returns once they are done (if grain changes that internal, the wait is skipped)."""
    gc.collect()
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:
        return
    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
        pool.apply(int)


class BatchIterator:
    """This process's batches from a grain iterator, minus the bad-file bookkeeping: logs each bad file once
    (naming it), a count per epoch (train) or at the end (eval), and keeps the total in `bad_files`.

    `get_state`/`set_state` are the grain iterator's (the position in the batch stream)."""

    def __init__(self, iterator, source, *, kind: str, start_step: int = 0, global_batch_size: int = 1,
                 workers: int = 0):
        self._iterator = iterator
        self._workers = workers  # batches from worker processes live in shared memory
        self._source = source
        self._kind = kind
        self._step = start_step  # global batch index of the next batch
        self._global_batch_size = global_batch_size
        self._seen = set()
        self.bad_files = 0  # elements replaced (train) or left out (eval) in this process so far
        self._bad_this_epoch = 0

    def __iter__(self):
        return self

    def __next__(self):
        try:
            with interrupts_held():  # a next() may start worker processes: see interrupts_held
                batch = next(self._iterator)
        except StopIteration:
            self.end_pass()
            raise
        bad = batch.pop("bad_index", None)
        if bad is not None:
            for index in bad[bad >= 0].tolist():
                self.bad_files += 1
                self._bad_this_epoch += 1
                if index not in self._seen:
                    self._seen.add(index)
                    action = "left out of eval" if self._kind == "eval" else "replaced by another example"
                    logging.warning("unreadable image, %s: %s", action, describe_bad_file(self._source, index))
        if self._kind == "train":
            n = len(self._source)
            start, end = self._step * self._global_batch_size, (self._step + 1) * self._global_batch_size
            if end // n > start // n and self._bad_this_epoch:
                logging.warning("epoch %d: %d unreadable image(s) replaced by other examples (this process)",
                                start // n + 1, self._bad_this_epoch)
                self._bad_this_epoch = 0
            self._step += 1
        return batch

    def end_pass(self) -> None:
        """An eval pass is over: report its unreadable files."""
        if self._kind == "eval" and self._bad_this_epoch:
            logging.warning("eval: %d unreadable image(s) left out of the metrics (this process)",
                            self._bad_this_epoch)
        self._bad_this_epoch = 0

    def close(self) -> None:
        """Stops the grain worker processes and frees their shared memory (also when a rollback replaces the
        iterator, and at exit, where a leak would be reported by multiprocessing's resource tracker)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
            if self._workers:  # without workers there is no shared memory, and its wait costs a gc.collect()
                _finish_shared_memory_release()

    def get_state(self):
        return self._iterator.get_state()

    def set_state(self, state):
        self._iterator.set_state(state)


def train_dataset(source, *, global_batch_size: int, seed: int, image_size: int, resize_size: int,
                  augment: str = "alexnet", process_index: int = 0, process_count: int = 1,
                  batch_reads: bool = True, device_crops: bool = False) -> grain.MapDataset:
    """An endless MapDataset of this process's local train batches; element b is its part of global batch b.

    alexnet crops of a source that holds pixels are read a batch per element (BatchCrops); batch_reads=False
    maps one example per element instead, as for every other source and view (the same pixels, slower).
    device_crops=True ships such a source's stored arrays whole with their stream positions (StoredPixels) for
    the train step to crop; see device_crop_problem for the sources that qualify."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    local = _local_batch_size(global_batch_size, process_count)
    if device_crops or (batch_reads and augment == "alexnet" and getattr(source, "holds_pixels", False)):
        # The same shuffled stream as below (a shuffle permutes positions whatever its parent holds), as indices.
        ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None).map_with_index(StreamIndex())
        ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
        if device_crops:
            problem = device_crop_problem(source, {"device_crops": True, "augment": augment,
                                                   "source": type(source).__name__, "image_size": image_size,
                                                   "resize_size": resize_size})
            if problem:
                raise ValueError(problem)
            return ds.map(StoredPixels(source, tuple(source.uniform_pixels)))
        return ds.map(BatchCrops(source, image_size, resize_size, seed))
    records = _records(source)
    ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat(None)
    ds = ds.random_map(TrainTransform(image_size, resize_size, augment,
                                      records if records is not source else None), seed=seed)
    return ds.batch(local, drop_remainder=True)[process_index::process_count]


def train_batches(source, *, start_step: int = 0, workers: int = 0, worker_threads: int = 0, worker_buffer: int = 1,
                  **kwargs) -> BatchIterator:
    """Iterator over this process's local train batches, starting at global batch `start_step`."""
    iterator = _to_iterator(train_dataset(source, **kwargs)[start_step:], workers, worker_threads, worker_buffer)
    return BatchIterator(iterator, source, kind="train", start_step=start_step,
                         global_batch_size=kwargs["global_batch_size"], workers=workers)


def eval_dataset(source, *, global_batch_size: int, image_size: int, resize_size: int, eval_crops: int = 1,
                 process_index: int = 0, process_count: int = 1, on_device: bool = False) -> grain.MapDataset:
    """Every eval example exactly once, in order; the last global batch is padded and `mask` marks real rows.

    eval_crops=10 ships the central resize_size x resize_size square instead of the image_size crop; the
    device cuts the paper's ten views from it (transforms.ten_crop_probabilities). on_device=True (see
    eval_views_on_device) ships the stored pixels whole, a batch per read (StoredPixels), for the eval step to
    cut the same central view from."""
    if eval_crops not in EVAL_CROPS:
        raise ValueError(f"eval_crops must be one of {EVAL_CROPS}, got {eval_crops!r}")
    local = _local_batch_size(global_batch_size, process_count)
    length = -(-len(source) // global_batch_size) * global_batch_size
    if on_device:
        ds = grain.MapDataset.range(length).map(EvalIndex(len(source)))
        return ds.batch(local)[process_index::process_count].map(StoredPixels(source, tuple(source.uniform_pixels)))
    ds = grain.MapDataset.source(PaddedSource(_records(source), length))
    ds = ds.map(EvalTransform(image_size, resize_size, eval_crops))
    return ds.batch(local)[process_index::process_count]


def eval_batches(source, *, workers: int = 0, worker_threads: int = 0, worker_buffer: int = 1,
                 **kwargs) -> BatchIterator:
    iterator = _to_iterator(eval_dataset(source, **kwargs), workers, worker_threads, worker_buffer)
    return BatchIterator(iterator, source, kind="eval", workers=workers)


class RepeatedPasses:
    """Repeated passes over a finite dataset of local batches from one grain iterator, so worker processes start
    once per run rather than once per pass. Each call yields exactly one pass of this process's batches."""

    def __init__(self, ds: grain.MapDataset, source, *, kind: str, workers: int = 0, worker_threads: int = 0,
                 worker_buffer: int = 1):
        self.batches_per_pass = len(ds)
        # The stream runs on into the next pass; the workers prefetch its first batches while training goes on.
        self._batches = BatchIterator(_to_iterator(ds.repeat(None), workers, worker_threads, worker_buffer), source,
                                      kind=kind, workers=workers)

    def __call__(self):
        for _ in range(self.batches_per_pass):
            yield next(self._batches)
        self._batches.end_pass()

    def close(self) -> None:
        self._batches.close()


def eval_passes(source, *, workers: int = 0, worker_threads: int = 0, worker_buffer: int = 1,
                **kwargs) -> RepeatedPasses:
    """Passes over the eval split (see eval_dataset), one per call."""
    return RepeatedPasses(eval_dataset(source, **kwargs), source, kind="eval", workers=workers,
                          worker_threads=worker_threads, worker_buffer=worker_buffer)


def stats_dataset(source, *, num_examples: int, global_batch_size: int, seed: int, image_size: int,
                  resize_size: int, process_index: int = 0, process_count: int = 1,
                  on_device: bool = False) -> grain.MapDataset:
    """The BatchNorm-statistics set (train/precise_bn.py): a fixed sample of `num_examples` training examples
    (a multiple of the global batch), drawn by the seed, in the eval view, cut into global batches as training
    cuts its stream. Its own dataset, never the training stream, so the batches training sees do not depend on
    where statistics were computed. An unreadable file is replaced by another example, as in training: a black
    placeholder would skew every layer's moments. on_device=True: the stored pixels whole, as eval_dataset's."""
    local = _local_batch_size(global_batch_size, process_count)
    # A fixed list of indices, not a grain shuffle: grain reshuffles a shuffled dataset at every repetition, and
    # the set must be the same examples at every eval and save.
    chosen = np.random.default_rng(seed).permutation(len(source))[:num_examples]
    if on_device:
        ds = grain.MapDataset.source(chosen).map(_source_index).batch(local, drop_remainder=True)
        return ds[process_index::process_count].map(StoredPixels(source, tuple(source.uniform_pixels)))
    records = _records(source)
    ds = grain.MapDataset.source(Subset(records, tuple(int(i) for i in chosen)))
    ds = ds.random_map(TrainTransform(image_size, resize_size, EVAL_VIEW, records if records is not source else None),
                       seed=seed)
    return ds.batch(local, drop_remainder=True)[process_index::process_count]


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    return max(1, num_examples // global_batch_size)
