"""Text-classification data: read tables, map labels, split the SMS spam set as the book does,
encode, pad and batch. Plain Python, NumPy and pandas; no JAX.

tables (the one CSV/TSV/JSONL reader), labels (the one label mapping), sms (the book's recipe),
splits (user files to splits), shapes (tokens, padding, length buckets), records (whole rows for
tasks beyond single-label text), examples (an example's fields to its token rows, every layout).
"""

from jaxcls.data.labels import DataSplits, LabelMap, TextDataset, label_ids, multi_hot, targets
from jaxcls.data.shapes import (
    PADDING_MODES,
    batches,
    default_bucket_lengths,
    encode_texts,
    fine_bucket_lengths,
    length_buckets,
    pad_batch,
    resolve_pad_length,
)
from jaxcls.data.sms import SMS_SPAM_LABELS, SMS_SPAM_URL, load_sms_spam
from jaxcls.data.splits import load_data, load_spec, load_splits, task_dataset
from jaxcls.data.tables import LabelledTable, TableReader, read_labelled, read_table

__all__ = [
    "DataSplits", "LabelMap", "LabelledTable", "PADDING_MODES", "SMS_SPAM_LABELS", "SMS_SPAM_URL",
    "TableReader", "TextDataset", "batches", "default_bucket_lengths", "encode_texts",
    "fine_bucket_lengths", "label_ids", "length_buckets", "load_data", "load_sms_spam",
    "load_spec", "load_splits", "multi_hot", "pad_batch", "read_labelled", "read_table",
    "resolve_pad_length", "targets", "task_dataset",
]
