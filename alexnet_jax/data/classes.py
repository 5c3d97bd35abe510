"""The 1000 ImageNet-1k (ILSVRC2012) classes: WordNet ids and human-readable names, shipped as package data.

`imagenet_classes.tsv` holds one `wnid<TAB>name` line per class, in sorted-wnid order -- the order an ImageFolder
of ILSVRC2012 train gives (sorted sub-folder names) and the label order of torchvision, timm and Keras models.
The list was taken from timm's `data/_info/imagenet_synsets.txt` + `imagenet_synset_to_lemma.txt` (Apache-2.0)
and checked identical, name for name, against the `imagenet-classes` package's index->name table (MIT).

The devkit's ILSVRC2012_ID order (used by `ILSVRC2012_validation_ground_truth.txt`) is a different order; it is
not shipped here, see `read_synset_list`.
"""

import functools
import importlib.resources
import re

_WNID = re.compile(r"^n\d{8}$")


@functools.cache
def imagenet_synsets() -> tuple[tuple[str, str], ...]:
    """((wnid, name), ...) for the 1000 classes, label order."""
    text = importlib.resources.files("alexnet_jax.data").joinpath("imagenet_classes.tsv").read_text("utf-8")
    rows = tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if line.strip())
    assert len(rows) == 1000, len(rows)
    return rows


def imagenet_wnids() -> list[str]:
    return [wnid for wnid, _ in imagenet_synsets()]


@functools.cache
def _names_by_wnid() -> dict[str, str]:
    return dict(imagenet_synsets())


def display_name(class_name: str, short: bool = False) -> str:
    """A class name as a person wants to read it: an ImageNet wnid becomes its words ("n01440764" -> "tench,
    Tinca tinca", or "tench" with short=True); any other name is returned as it is."""
    words = _names_by_wnid().get(class_name)
    if words is None:
        return class_name
    return words.split(",")[0].strip() if short else words


def read_synset_list(path: str) -> list[str]:
    """Wnids in file order from a text file with one class per line, whose first wnid-looking token (n + 8
    digits) is taken: plain `n01440764`, `n01440764 tench, Tinca tinca` (LOC_synset_mapping.txt) and
    `1 n02119789 kit fox` (ILSVRC2012_ID first, as exported from the devkit's meta.mat) all work."""
    wnids = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            tokens = line.replace(",", " ").split()
            if not tokens:
                continue
            found = next((t for t in tokens if _WNID.match(t)), None)
            if found is None:
                raise ValueError(f"{path}:{number}: no WordNet id (n + 8 digits) on this line")
            wnids.append(found)
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{path}: a WordNet id is listed twice")
    return wnids
