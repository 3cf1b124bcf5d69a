"""Inference: text readers and prediction writers (io)."""
