"""Checkpoints and saved classifiers: the name table (names), OpenAI's TF bundles (openai, with
sstable and crc32c), Hugging Face safetensors (hf), the one strict tensor matcher and loading
(load), OpenAI's released sizes (download), and the saved-classifier folder (folder)."""
