"""The Large Movie Review Dataset (Maas et al., 2011) as the book's bonus IMDB experiment splits it
(ch06/03_bonus_imdb-classification/download_prepare_dataset.py): the 50,000 labelled reviews of
train/ and test/ in the order that script reads them (test before train, pos before neg, file
names sorted), shuffled twice with random_state=123, then cut 35,000 / 5,000 / the rest."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import pandas as pd

from jaxcls.data.labels import DataSplits, TextDataset
from jaxcls.errors import DataError

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
# The archive's published sha256 (the same value in MLDatasets.jl, the Rust `datasets` crates and
# other loaders that verify this download).
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"
IMDB_FILE = "aclImdb_v1.tar.gz"
IMDB_LABELS = ("neg", "pos")  # ids 0 and 1, as the book's {"pos": 1, "neg": 0}
BOOK_SIZES = (35_000, 5_000, 10_000)
_MEMBER = re.compile(r"(?:\./)?aclImdb/(train|test)/(pos|neg)/([^/]+\.txt)")


def load_imdb(path: str | Path | None = None, *, seed: int = 123, sizes=BOOK_SIZES, url: str = IMDB_URL,
              sha256: str | None = IMDB_SHA256, progress: bool = True) -> DataSplits:
    """The book's IMDB splits. `path` is aclImdb_v1.tar.gz or a folder holding it; None means the
    copy in `cache_home()/"data/imdb"`, downloaded (resumable, checked by sha256) when absent.
    `sizes` are train and validation counts and the test count (the rest, as the book slices)."""
    tar = imdb_file(path, url=url, sha256=sha256, progress=progress)
    df = pd.DataFrame(read_reviews(tar), columns=["text", "label"])
    if len(df) < sum(sizes):
        raise DataError(f"{tar}: {len(df)} labelled reviews, fewer than the {sum(sizes)} the split needs")
    df = df.sample(frac=1, random_state=seed).reset_index(drop=True)  # the script shuffles when it loads
    df = df.sample(frac=1, random_state=seed).reset_index(drop=True)  # and again when it partitions
    ends = (sizes[0], sizes[0] + sizes[1], len(df))
    parts = {"train": df.iloc[:ends[0]], "validation": df.iloc[ends[0]:ends[1]], "test": df.iloc[ends[1]:]}
    made = {name: TextDataset(tuple(p["text"]), p["label"].to_numpy(), IMDB_LABELS, f"imdb:{name}")
            for name, p in parts.items()}
    return DataSplits(**made, label_names=IMDB_LABELS)


def read_reviews(tar_path: Path) -> list[tuple[str, int]]:
    """(text, label) of every labelled review, in the book's reading order. Texts are decoded as
    UTF-8 with universal newlines, as the script's open(..., "r") reads them."""
    found: dict[tuple[str, str], list[tuple[str, str]]] = {}
    try:
        with tarfile.open(tar_path, "r:gz") as tf:
            for member in tf:
                m = _MEMBER.fullmatch(member.name)
                if m is None or not member.isfile():
                    continue
                raw = tf.extractfile(member).read()
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{tar_path}: {member.name} is not UTF-8 ({e.reason})") from None
                text = text.replace("\r\n", "\n").replace("\r", "\n")
                found.setdefault(m.group(1, 2), []).append((m.group(3), text))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{tar_path}: not a readable .tar.gz ({e})") from None
    if not found:
        raise DataError(f"{tar_path}: holds no aclImdb/{{train,test}}/{{pos,neg}}/*.txt reviews")
    rows = []
    for subset in ("test", "train"):
        for label in ("pos", "neg"):
            rows += [(text, IMDB_LABELS.index(label)) for _, text in sorted(found.get((subset, label), []))]
    return rows


def imdb_cache_file() -> Path:
    """Where the archive is kept once downloaded (`--offline` looks here)."""
    from jaxcls.download import cache_home

    return cache_home() / "data" / "imdb" / IMDB_FILE


def imdb_file(path: str | Path | None = None, *, url: str = IMDB_URL, sha256: str | None = IMDB_SHA256,
              progress: bool = True) -> Path:
    """The archive `load_imdb(path)` reads: `path`, or aclImdb_v1.tar.gz in the folder `path`,
    else the cache's copy, downloaded from `url` only when it is not there."""
    if path is None:
        from jaxcls.download import download_file

        return download_file(url, imdb_cache_file(), sha256=sha256, progress=progress)
    path = Path(path)
    if path.is_dir():
        path = path / IMDB_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such file (want {IMDB_FILE}, from {IMDB_URL})")
    return path
