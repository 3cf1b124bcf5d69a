"""The SMS Spam Collection, balanced and split as the book's chapter 6 does."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from jaxcls.data.labels import DataSplits, TextDataset
from jaxcls.errors import DataError

if TYPE_CHECKING:
    import pandas as pd  # imported where used: only the SMS reader needs it, and it costs 0.15 s

SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_SPAM_LABELS = ("ham", "spam")
# Names the SMS file and its zip go by: UCI's own, and the book's after it unzips and renames.
_SMS_FILES = ("SMSSpamCollection", "SMSSpamCollection.tsv")
_SMS_ZIPS = ("sms+spam+collection.zip", "sms_spam_collection.zip")


def load_sms_spam(
    path: str | Path | None = None, *, seed: int = 123, progress: bool = True
) -> DataSplits:
    """The book's SMS spam splits (1045 / 149 / 300 at seed 123): ham undersampled to the spam
    count, shuffled, cut 70/10/20.

    `path` is the SMSSpamCollection file, UCI's zip, or a folder holding either. None means the
    copy in `cache_home()/"data/sms_spam"`, else the one packaged with jaxcls (sms_spam_file).
    """
    import pandas as pd

    df = _read_sms_frame(sms_spam_file(path, progress=progress))
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=seed)
    balanced = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced["Label"] = balanced["Label"].map({"ham": 0, "spam": 1})
    balanced = balanced.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(balanced) * 0.7)
    validation_end = train_end + int(len(balanced) * 0.1)
    parts = {
        "train": balanced[:train_end],
        "validation": balanced[train_end:validation_end],
        "test": balanced[validation_end:],
    }
    made = {
        name: TextDataset(
            texts=tuple(part["Text"]),
            labels=part["Label"].to_numpy(),
            label_names=SMS_SPAM_LABELS,
            source=f"sms-spam:{name}",
        )
        for name, part in parts.items()
    }
    return DataSplits(**made, label_names=SMS_SPAM_LABELS)


def sms_spam_file(path: str | Path | None = None, *, progress: bool = True) -> Path:
    """The copy of the collection `load_sms_spam(path)` reads: `path` (a file, or a folder holding
    one), else the one in `cache_home()/"data/sms_spam"`, else the copy packaged with jaxcls
    (checked by its sha256). Only when none of them exists is UCI's zip downloaded into the cache."""
    if path is None:
        from jaxcls.assets import SMS_SPAM_ZIP, packaged
        from jaxcls.download import cache_home, download_file

        folder = cache_home() / "data" / "sms_spam"
        found = _sms_in_folder(folder)
        if found is not None:
            return found
        if SMS_SPAM_ZIP.exists():
            return packaged(SMS_SPAM_ZIP)
        return download_file(SMS_SPAM_URL, folder / _SMS_ZIPS[0], progress=progress)
    path = Path(path)
    if path.is_dir():
        found = _sms_in_folder(path)
        if found is None:
            wanted = ", ".join(_SMS_FILES + _SMS_ZIPS)
            raise DataError(f"{path}: folder holds none of {wanted}")
        return found
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    return path


def describe_sms_file(found: Path) -> str:
    """For the log: which copy of the collection a run read."""
    from jaxcls.assets import SMS_SPAM_ZIP

    if found.resolve() == SMS_SPAM_ZIP:
        return f"the copy packaged with jaxcls ({found}; CC BY 4.0, Almeida & Hidalgo, UCI)"
    return str(found)


def _sms_in_folder(folder: Path) -> Path | None:
    for name in _SMS_FILES + _SMS_ZIPS:
        if (folder / name).is_file():
            return folder / name
    return None


def _read_sms_frame(path: Path) -> "pd.DataFrame":
    """Read as the book does (default quoting, so 5,572 rows); odd bytes are replaced, not fatal."""
    import pandas as pd

    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.namelist() if Path(m).name == _SMS_FILES[0]]
                if not members:
                    raise DataError(f"{path}: zip has no {_SMS_FILES[0]} (holds {zf.namelist()})")
                source = io.BytesIO(zf.read(members[0]))
        except zipfile.BadZipFile as e:
            raise DataError(f"{path}: damaged zip ({e})") from None
    else:
        source = path
    try:
        df = pd.read_csv(
            source, sep="\t", header=None, names=["Label", "Text"], encoding_errors="replace"
        )
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError(f"{path}: not a label<TAB>text file ({e})") from None
    bad = df[~df["Label"].isin(SMS_SPAM_LABELS)]
    if len(bad):
        raise DataError(
            f"{path}: row {bad.index[0] + 1} has label {bad['Label'].iloc[0]!r}; "
            f"expected one of {SMS_SPAM_LABELS}"
        )
    if df["Text"].isna().any():
        raise DataError(f"{path}: row {int(df['Text'].isna().argmax()) + 1} has no text")
    return df
