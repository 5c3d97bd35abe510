"""Image files on disk as random-access sources: an ImageFolder (class = sub-folder) and the flat ILSVRC val folder.

Both list their files once, at construction, in a fixed order (sorted by class, then relative path), so every
process and every grain worker sees the same index -> file mapping. They keep the list compactly (one bytes blob
plus offsets) because grain pickles the source into every worker process: 1.28M ImageNet paths pickle to ~60 MB
as Python strings but a single ~35 MB buffer here.

Reading an element is cheap (`read_record`: the file's bytes, label and index); decoding happens in the grain
transform, where the crop size is known (data/decode.py decodes only at the resolution the crop needs). A file
that turns out not to be an image is therefore found at decode time, not here: see data/pipeline.py for what
happens then. `src[i]` still gives the decoded picture for anyone who wants it (and raises BadImageError).
"""

import csv
import os

import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from alexnet_jax import storage
from alexnet_jax.data import classes, decode

GROUND_TRUTH_FILES = ("LOC_val_solution.csv", "ILSVRC2012_validation_ground_truth.txt")


def image_extensions() -> frozenset[str]:
    """Lower-case extensions of every format this Pillow can open (".jpeg", ".jpg", ".png", ".webp", ...)."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


_skipped_entries: set[str] = set()  # warned about already: a folder is listed more than once per process


def _skip(path: str, why: str) -> None:
    if path not in _skipped_entries:
        _skipped_entries.add(path)
        logging.warning("%s: skipped: %s", path, why)


UNFOLLOWABLE = "unfollowable"


def _directory_id(entry: os.DirEntry):
    """(device, inode) of the directory an entry leads to, following symlinks; None if it is no directory (a
    file, or a symlink to nothing); UNFOLLOWABLE, with a warning naming it, if it cannot be followed, e.g. a
    symlink that points at itself ("Too many levels of symbolic links")."""
    try:
        if not entry.is_dir(follow_symlinks=True):
            return None
        info = os.stat(entry.path)
    except OSError as error:
        _skip(entry.path, error.strerror or str(error))
        return UNFOLLOWABLE
    return info.st_dev, info.st_ino


def list_image_files(directory: str, recursive: bool = True) -> list[str]:
    """Relative paths (posix separators) of the image files under `directory`, sorted; hidden files and folders
    and files whose extension (any case) is not an image format are ignored. Symlinks are followed, except one
    that leads back into a folder it is inside (a loop), which is skipped with a warning."""
    extensions = image_extensions()
    if storage.is_remote(directory):
        names = storage.list_remote_files(directory, recursive)
        return sorted(n for n in names if not any(_is_hidden(part) for part in n.split("/"))
                      and os.path.splitext(n)[1].lower() in extensions)
    found = []

    def walk(path: str, prefix: str, ancestors: frozenset):
        with os.scandir(path) as entries:
            for entry in entries:
                if _is_hidden(entry.name):
                    continue
                folder = _directory_id(entry)
                if folder is None:
                    if os.path.splitext(entry.name)[1].lower() in extensions:
                        found.append(prefix + entry.name)
                elif folder in ancestors:
                    _skip(entry.path, "a symlink loop (it leads back to a folder it is in)")
                elif recursive and folder is not UNFOLLOWABLE:
                    walk(entry.path, prefix + entry.name + "/", ancestors | {folder})

    top = os.stat(directory)
    walk(directory, "", frozenset({(top.st_dev, top.st_ino)}))
    return sorted(found)


def class_folders(directory: str) -> list[str]:
    """Sorted names of the non-hidden sub-folders: the classes of an ImageFolder."""
    if storage.is_remote(directory):
        return sorted(name for name in storage.list_remote_folders(directory) if not _is_hidden(name))
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries
                      if not _is_hidden(e.name) and _directory_id(e) not in (None, UNFOLLOWABLE))


class FileSource:
    """Files under `root` with labels. Subclasses fill `_set_files(relative_paths, labels)` and `class_names`."""

    root: str
    class_names: list[str]

    def _set_files(self, relative_paths: list[str], labels: list[int]):
        encoded = [os.fsencode(p) for p in relative_paths]
        self._offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._blob = b"".join(encoded)
        self._labels = np.asarray(labels, np.int32)

    def __len__(self):
        return len(self._labels)

    def relative_path(self, index: int) -> str:
        return os.fsdecode(self._blob[self._offsets[index]:self._offsets[index + 1]])

    def name(self, index: int) -> str:
        """The file behind element `index` (a local path or a gs:// URL)."""
        return os.path.join(self.root, self.relative_path(index))  # posix joins keep a gs:// URL intact

    def label(self, index: int) -> int:
        return int(self._labels[index])

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def read_record(self, index: int) -> dict:
        """The element undecoded: {"encoded": file bytes, "label", "index"}. An unreadable file (permissions, I/O
        error, a dangling symlink) gives empty bytes, which decoding then reports as a bad file like any other,
        and "read_error": the OS's reason, for the messages that name the file."""
        index = int(index)
        record = {"label": np.int32(self._labels[index]), "index": np.int64(index)}
        try:
            record["encoded"] = storage.read_bytes(self.name(index))
        except OSError as error:
            record["encoded"], record["read_error"] = b"", error.strerror or str(error)
        return record

    def __getitem__(self, index):
        record = self.read_record(index)
        try:
            image = decode.decode(record["encoded"])
        except decode.BadImageError as error:
            raise decode.BadImageError(f"{self.name(index)}: {record.get('read_error', error)}") from error
        return {"image": image, "label": int(record["label"])}


class ImageFolderSource(FileSource):
    """root/<class>/**/<image>: class = sub-folder, labels in sorted sub-folder order (torchvision's ImageFolder).

    Pass `class_names` (e.g. the train split's) to label another split the same way: a sub-folder not in it is
    an error rather than a silently shifted label; classes with no folder here simply have no examples.
    """

    def __init__(self, root: str, class_names: list[str] | None = None):
        self.root = root
        folders = class_folders(root)
        if not folders:
            raise ValueError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
        self.class_names = list(class_names) if class_names is not None else folders
        label_of = {name: label for label, name in enumerate(self.class_names)}
        unknown = [f for f in folders if f not in label_of]
        if unknown:
            raise ValueError(f"{root}: class folder(s) {', '.join(unknown[:5])} are not among the "
                             f"{len(self.class_names)} training classes")
        paths, labels = [], []
        for folder in folders:
            files = list_image_files(storage.join(root, folder))
            if not files:
                logging.warning("%s: class folder %s holds no image files", root, folder)
            paths += [folder + "/" + f for f in files]
            labels += [label_of[folder]] * len(files)
        if not paths:
            raise ValueError(f"{root}: no image files in any class folder")
        self._set_files(paths, labels)


def is_flat_image_folder(root: str) -> bool:
    """True if `root` holds image files directly and no class sub-folders with images (the ILSVRC val layout)."""
    return bool(list_image_files(root, recursive=False)) and not class_folders(root)


def find_ground_truth(root: str) -> str | None:
    """LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt in `root` or up to four folders above it
    (Kaggle's ILSVRC/Data/CLS-LOC/val sits four below its LOC_val_solution.csv)."""
    directory = epath.Path(storage.absolute(root))
    for _ in range(5):
        for name in GROUND_TRUTH_FILES:
            candidate = directory / name
            if candidate.is_file():
                return os.fspath(candidate)
        if storage.is_remote(root) and "/" not in os.fspath(directory).split("://", 1)[1]:
            break  # searched the bucket itself: there is nothing above it
        directory = directory.parent
    return None


def read_ground_truth(path: str, devkit_synsets: list[str] | None = None) -> dict[str, str]:
    """{image id (file name without extension): wnid} from either ground-truth format.

    - LOC_val_solution.csv: `ImageId,PredictionString`; the first token of PredictionString is the wnid.
    - ILSVRC2012_validation_ground_truth.txt (devkit): line i is the 1-based ILSVRC2012_ID of ILSVRC2012_val_<i>
      (8 digits). Those ids are in the devkit's meta.mat order, not sorted-wnid order, so this needs
      `devkit_synsets`: the wnids in ILSVRC2012_ID order (data.labels_file).
    """
    truth = {}
    if path.lower().endswith(".csv"):
        with epath.Path(path).open("r") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                raise ValueError(f"{path}: expected the header ImageId,PredictionString")
            for row in reader:
                if len(row) >= 2 and row[1].split():
                    truth[row[0].strip()] = row[1].split()[0]
        return truth
    if devkit_synsets is None:
        raise ValueError(f"{path} holds the devkit's ILSVRC2012_IDs: set data.labels_file to the synset list in "
                         "devkit (meta.mat ILSVRC2012_ID) order, or use LOC_val_solution.csv")
    with epath.Path(path).open("r") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            ilsvrc_id = int(line.split()[0])
            if not 1 <= ilsvrc_id <= len(devkit_synsets):
                raise ValueError(f"{path}:{number}: ILSVRC2012_ID {ilsvrc_id} is outside the "
                                 f"{len(devkit_synsets)} synsets of data.labels_file")
            truth[f"ILSVRC2012_val_{number:08d}"] = devkit_synsets[ilsvrc_id - 1]
    return truth


class FlatValSource(FileSource):
    """A folder of images + a ground-truth file (the official ILSVRC2012 val layout), labelled by `class_names`.

    Files the ground truth does not name are left out with a warning (never guessed); ground-truth entries with
    no file are only counted (a subset of val is fine).
    """

    def __init__(self, root: str, class_names: list[str], ground_truth: str | None = None,
                 devkit_synsets: list[str] | None = None):
        self.root = root
        self.class_names = list(class_names)
        ground_truth = ground_truth or find_ground_truth(root)
        if ground_truth is None:
            raise ValueError(f"{root}: a flat image folder needs a ground-truth file ({' or '.join(GROUND_TRUTH_FILES)}"
                             " beside it, or data.val_labels)")
        self.ground_truth = ground_truth
        truth = read_ground_truth(ground_truth, devkit_synsets)
        label_of = {name: label for label, name in enumerate(self.class_names)}
        unknown = sorted({w for w in truth.values() if w not in label_of})
        if unknown:
            raise ValueError(f"{ground_truth}: class(es) {', '.join(unknown[:5])} are not among the "
                             f"{len(self.class_names)} training classes")
        paths, labels, unlabelled = [], [], []
        for path in list_image_files(root, recursive=False):
            wnid = truth.get(os.path.splitext(path)[0])
            if wnid is None:
                unlabelled.append(path)
            else:
                paths.append(path)
                labels.append(label_of[wnid])
        if unlabelled:
            logging.warning("%s: %d image file(s) not in %s are left out, e.g. %s", root, len(unlabelled),
                            ground_truth, unlabelled[0])
        if len(paths) < len(truth):
            logging.info("%s: %d of the %d images in %s are present", root, len(paths), len(truth), ground_truth)
        if not paths:
            raise ValueError(f"{root}: none of its image files is named in {ground_truth}")
        self._set_files(paths, labels)


def training_class_names(train_path: str) -> list[str]:
    """The class list labels must agree with: the train ImageFolder's sub-folders when train_path is one (a
    cheap listing), else the 1000 ImageNet wnids in sorted order."""
    if (train_path and epath.Path(train_path).is_dir()
            and not epath.Path(train_path, "manifest.json").is_file()):
        folders = class_folders(train_path)
        if folders:
            return folders
    return classes.imagenet_wnids()


def create(path: str, *, class_names: list[str] | None = None, ground_truth: str = "",
           labels_file: str = "") -> FileSource:
    """An ImageFolderSource, or a FlatValSource when `path` is a flat folder of images."""
    if not epath.Path(path).is_dir():
        raise ValueError(f"{path}: not a directory")
    if is_flat_image_folder(path):
        devkit = classes.read_synset_list(labels_file) if labels_file else None
        return FlatValSource(path, class_names if class_names is not None else classes.imagenet_wnids(),
                             ground_truth or None, devkit)
    return ImageFolderSource(path, class_names)
