"""Convert an image folder to ArrayRecord shards for the `arrayrecord` source.

    python -m alexnet_jax.data.convert --src=/data/imagenet/train --dst=/data/imagenet-ar/train --shards=1024 \\
        [--resize=256] [--format=jpeg|raw|pixels] [--center_crop=N] [--quality=95] [--workers=K]
    python -m alexnet_jax.data.convert --src=/data/imagenet/val --dst=/data/imagenet-ar/val --shards=64 \\
        --classes_from=/data/imagenet/train      # a flat val folder: its ground truth is found beside it

`--src` is an ImageFolder (class = sub-folder) or a flat val folder with LOC_val_solution.csv /
ILSVRC2012_validation_ground_truth.txt (`--val_labels`, `--labels_file` as data.val_labels / data.labels_file).
Every file is decoded (EXIF orientation applied, any mode to RGB), its short side brought down to `--resize`
(never up; 0 keeps the size), and stored re-encoded as JPEG or as raw uint8 pixels, with its label and name.
`--format=raw --center_crop=N` keeps only the central N x N pixels of the resized picture (smaller records; train
crops then come from that region, at the whole picture's scale: the record keeps the picture's short side).
There, pictures smaller than `--resize` are scaled up to it, as the train view would scale them anyway, so that
every record is N x N (the manifest's "shape"): what `data.device_crops` needs.
`--format=pixels --resize=R --center_crop=N` writes those same pixels as pixel shards (data/pixelshards.py): flat
files of N*N*3-byte records with no headers, labels and names in a sidecar, read by one os.preadv per example
straight into the batch (one copy, where ArrayRecord makes two); `data.source=arrayrecord`
opens them by their manifest's encoding.
Files that do not decode are skipped, one line each naming the file, and listed in the manifest.

`--src` and `--dst` may be gs:// URLs: a shard bound for gs:// is written to a local temporary file (the
ArrayRecord writer needs a local file), checksummed and uploaded, and appears in the bucket only once complete.

The files are dealt to shards in a fixed shuffled order (seed `--seed`), so shards mix classes. Each shard is
written to a temporary name, checksummed, renamed, and marked done with a small `<shard>.done.json`; rerunning
the same command skips shards already done (resume after an interruption), then writes `manifest.json`: class
names, per-class counts, per-shard record counts, sizes and sha256, and the skipped files.
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from etils import epath

from alexnet_jax import storage
from alexnet_jax.data import arrayrecord, decode, imagefolder, pixelshards

STATE_FILE = "convert_state.json"


def shard_name(index: int, count: int, fmt: str) -> str:
    suffix = pixelshards.SHARD_SUFFIX if fmt == pixelshards.ENCODING else ".array_record"
    return f"data-{index:05d}-of-{count:05d}{suffix}"


def _fingerprint(source, args) -> dict:
    """What a resumed run must agree with: the file list, labels and every option that changes the bytes."""
    digest = hashlib.sha256(source._blob)
    digest.update(source._offsets.tobytes())
    digest.update(source.labels.tobytes())
    return {"files": len(source), "file_list_sha256": digest.hexdigest(), "class_names": source.class_names,
            "shards": args.shards, "resize": args.resize, "format": args.format, "quality": args.quality,
            "center_crop": args.center_crop,
            "seed": args.seed}


def shard_assignment(num_files: int, num_shards: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(num_files)
    bounds = [num_files * k // num_shards for k in range(num_shards + 1)]
    return [order[bounds[k]:bounds[k + 1]] for k in range(num_shards)]


def encode_example(data: bytes, resize: int, fmt: str, quality: int,
                   center_crop: int = 0) -> tuple[bytes, tuple | None, int | None]:
    """(payload, shape or None, short side of the picture or None) for one file's bytes; raises
    decode.BadImageError. The short side is given only when the pixels are its central region."""
    from PIL import Image
    import io

    # With a central region every record gets the one N x N shape: small pictures are scaled up to --resize.
    pixels = decode.decode_resized(data, resize, enlarge=bool(center_crop and resize))
    if fmt in ("raw", pixelshards.ENCODING):
        short_side = None
        if center_crop:
            h, w = pixels.shape[:2]
            short_side = min(h, w)
            top, left = (h - min(h, center_crop)) // 2, (w - min(w, center_crop)) // 2
            pixels = pixels[top:top + center_crop, left:left + center_crop]
        return np.ascontiguousarray(pixels).tobytes(), pixels.shape, short_side
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue(), None, None


_worker = {}


def _init_worker(source, progress):
    _worker["source"], _worker["progress"] = source, progress


def convert_shard(task: dict) -> dict:
    """Writes one shard (temp name -> checksum -> rename or upload -> sidecar of pixel shards -> done marker);
    returns its done record."""
    from array_record.python.array_record_module import ArrayRecordWriter

    source, progress = _worker["source"], _worker.get("progress")
    final = storage.join(task["dst"], task["file"])
    remote = storage.is_remote(final)
    temporary = os.path.join(tempfile.mkdtemp(prefix="convert-"), task["file"]) if remote else final + ".tmp"
    counts = np.zeros(len(source.class_names), np.int64)
    skipped = []
    pixels = task["format"] == pixelshards.ENCODING
    # pixel shards: the payloads back to back in a plain file, their labels and names kept for the sidecar
    writer = open(temporary, "wb") if pixels else ArrayRecordWriter(temporary, arrayrecord.WRITER_OPTIONS)
    labels, names = [], []
    written = 0
    for index in task["indices"]:
        record = source.read_record(int(index))
        try:
            payload, shape, short_side = encode_example(record["encoded"], task["resize"], task["format"],
                                                        task["quality"], task["center_crop"])
        except decode.BadImageError as error:
            why = record.get("read_error", str(error))
            skipped.append({"file": source.relative_path(int(index)), "error": why})
        else:
            label, name = int(record["label"]), source.relative_path(int(index))
            if pixels:
                writer.write(payload)
                labels.append(label)
                names.append(name)
            else:
                writer.write(arrayrecord.encode_record(label, name, payload, task["format"], shape,
                                                       short_side=short_side))
            counts[label] += 1
            written += 1
        if progress is not None:
            with progress.get_lock():
                progress.value += 1
    writer.close()
    done = {"file": task["file"], "num_records": written, "bytes": os.path.getsize(temporary),
            "sha256": arrayrecord.file_sha256(temporary), "class_counts": counts.tolist(), "skipped": skipped}
    if pixels:
        index = pixelshards.index_text(labels, names)
        done["index_sha256"] = hashlib.sha256(index.encode("ascii")).hexdigest()
    if remote:
        _upload(temporary, final)
        shutil.rmtree(os.path.dirname(temporary))
    else:
        os.replace(temporary, final)
    if pixels:
        storage.write_text(final + pixelshards.INDEX_SUFFIX, index)
    _write_json(final + ".done.json", done)
    return done


def _upload(local: str, url: str) -> None:
    """Streams a local file to gs:// in chunks (shards can be large); the object exists once it is complete."""
    with open(local, "rb") as src, epath.Path(url).open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)


def _write_json(path: str, value) -> None:
    storage.write_text(path, json.dumps(value, indent=1))


def _finished(dst: str, file: str) -> dict | None:
    """The done record of a shard whose file is intact (size as recorded), else None."""
    marker = epath.Path(dst, file + ".done.json")
    try:
        done = json.loads(marker.read_text())
        return done if epath.Path(dst, file).stat().length == done["bytes"] else None
    except (OSError, ValueError, KeyError):
        return None


class Progress:
    """One line on stderr: a bar when it is a terminal, a line every ~10 s when it is a log."""

    def __init__(self, total: int, already: int):
        self.total, self.already, self.start = total, already, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def show(self, done: int, final: bool = False):
        now = time.monotonic()
        if not final and now - self.last < (0.5 if self.tty else 10.0):
            return
        self.last = now
        rate = (done - self.already) / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        width = 30
        filled = int(width * done / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} images, {rate:.0f} img/s"
                + (f", ETA {eta / 60:.1f} min" if np.isfinite(eta) and not final else ""))
        print(("\r" + line) if self.tty else line, end="\n" if final or not self.tty else "", file=sys.stderr,
              flush=True)


def convert(args) -> dict:
    """Runs (or resumes) a conversion; returns the manifest."""
    class_names = None
    if args.classes_from:
        manifest = epath.Path(args.classes_from, arrayrecord.MANIFEST)
        if manifest.is_file() or args.classes_from.endswith(".json"):
            class_names = arrayrecord.read_manifest(args.classes_from)["class_names"]
        else:
            class_names = imagefolder.training_class_names(args.classes_from)
    try:
        source = imagefolder.create(args.src, class_names=class_names, ground_truth=args.val_labels,
                                    labels_file=args.labels_file)
    except ValueError as error:
        if class_names is None and imagefolder.is_flat_image_folder(args.src):
            # Without --classes_from a flat val folder is labelled by the 1000 ImageNet classes.
            raise ValueError(f"{error}; pass --classes_from=<the train folder, or its converted directory> so this "
                             "split is labelled with the training classes") from None
        raise
    if args.shards > len(source):
        raise ValueError(f"--shards={args.shards} is more than the {len(source)} files in {args.src}")
    epath.Path(args.dst).mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(source, args)
    state_path = epath.Path(args.dst, STATE_FILE)
    if state_path.exists():
        previous = json.loads(state_path.read_text())
        if previous != fingerprint:
            changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
            raise ValueError(f"{args.dst} holds a conversion with other {', '.join(changed)}; "
                             "use an empty --dst or the same source and options")
    else:
        _write_json(state_path, fingerprint)

    assignment = shard_assignment(len(source), args.shards, args.seed)
    files = [shard_name(k, args.shards, args.format) for k in range(args.shards)]
    done = {f: _finished(args.dst, f) for f in files}
    todo = [k for k, f in enumerate(files) if done[f] is None]
    already = sum(len(assignment[k]) for k in range(args.shards) if done[files[k]] is not None)
    if len(todo) < args.shards:
        print(f"resuming: {args.shards - len(todo)} of {args.shards} shards already done", file=sys.stderr)
    tasks = [{"dst": args.dst, "file": files[k], "indices": assignment[k], "resize": args.resize,
              "format": args.format, "quality": args.quality, "center_crop": args.center_crop} for k in todo]

    progress = Progress(len(source), already)

    def report(record):
        done[record["file"]] = record
        for bad in record["skipped"]:
            print(f"skipped unreadable file {os.path.join(args.src, bad['file'])}: {bad['error']}", file=sys.stderr)

    workers = max(1, min(args.workers or os.cpu_count() or 1, len(tasks) or 1))
    if tasks and workers == 1:
        _init_worker(source, None)
        count = already
        for task in tasks:
            report(convert_shard(task))
            count += len(task["indices"])
            progress.show(count)
    elif tasks:
        context = multiprocessing.get_context("spawn")
        counter = context.Value("q", already)
        with context.Pool(workers, initializer=_init_worker, initargs=(source, counter)) as pool:
            results = pool.imap_unordered(convert_shard, tasks)
            remaining = len(tasks)
            while remaining:
                try:
                    record = results.next(timeout=0.5)
                except multiprocessing.TimeoutError:
                    progress.show(counter.value)
                    continue
                report(record)
                remaining -= 1
                progress.show(counter.value)
    progress.show(len(source), final=True)

    shards = [done[f] for f in files]
    counts = np.sum([s["class_counts"] for s in shards], axis=0).tolist()
    skipped = [dict(s, shard=d["file"]) for d in shards for s in d["skipped"]]
    manifest = {
        "format_version": 1,
        "source": storage.absolute(args.src),
        "class_names": source.class_names,
        "num_examples": int(sum(s["num_records"] for s in shards)),
        "class_counts": counts,
        "encoding": args.format,
        "resize": args.resize,
        "center_crop": args.center_crop or None,
        # every record's pixels, where they all have one shape (the central region of a --resize picture)
        "shape": [args.center_crop, args.center_crop, 3] if args.center_crop and args.resize else None,
        "quality": args.quality if args.format == "jpeg" else None,
        "shards": [{k: s[k] for k in ("file", "num_records", "bytes", "sha256", "index_sha256") if k in s}
                   for s in shards],
        "skipped": skipped,
    }
    _write_json(storage.join(args.dst, arrayrecord.MANIFEST), manifest)
    print(f"wrote {manifest['num_examples']} examples of {len(source.class_names)} classes in {args.shards} shards"
          f" to {args.dst}; {len(skipped)} unreadable file(s) skipped", file=sys.stderr)
    return manifest


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m alexnet_jax.data.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="ImageFolder (class sub-folders) or flat val folder")
    parser.add_argument("--dst", required=True, help="output directory (created; rerun to resume)")
    parser.add_argument("--shards", type=int, required=True, help="number of shards")
    parser.add_argument("--resize", type=int, default=256, help="short side at most this (0: keep the size)")
    parser.add_argument("--format", choices=(*arrayrecord.FORMATS, pixelshards.ENCODING), default="jpeg",
                        help="jpeg bytes or raw pixels in ArrayRecord records, or pixel shards (fixed-size raw "
                             "records; needs --resize and --center_crop)")
    parser.add_argument("--center_crop", type=int, default=0,
                        help="raw and pixels: keep the central NxN pixels of the resized picture (0: all of it)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the re-encoded images")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: one per CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the file -> shard deal")
    parser.add_argument("--classes_from", default="",
                        help="train ImageFolder or converted train dir whose classes label this split")
    parser.add_argument("--val_labels", default="", help="ground truth of a flat val folder (default: found)")
    parser.add_argument("--labels_file", default="", help="wnids in devkit ILSVRC2012_ID order (devkit txt only)")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error("--shards must be >= 1")
    if args.resize < 0 or not 1 <= args.quality <= 100 or args.workers < 0:
        parser.error("--resize and --workers must be >= 0, --quality in 1..100")
    if args.center_crop < 0 or (args.center_crop and args.format == "jpeg"):
        parser.error("--center_crop must be >= 0, and is for --format=raw or --format=pixels only")
    if args.format == pixelshards.ENCODING and not (args.resize and args.center_crop):
        parser.error("--format=pixels needs --resize and --center_crop (>= 1): every record must have one "
                     "N x N shape")
    if args.center_crop and args.resize and args.center_crop > args.resize:
        parser.error(f"--center_crop={args.center_crop} is more than the short side --resize={args.resize}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = storage.problem(args.src, "dir")
    if problem is not None:
        print(f"error: --src: {problem}", file=sys.stderr)
        return 2
    problem = storage.unwritable(args.dst)
    if problem:
        print(f"error: --dst: {problem}", file=sys.stderr)
        return 2
    try:
        convert(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
