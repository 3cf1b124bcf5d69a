"""Inference: the bucketed, jitted Predictor (predictor), text readers and prediction writers (io),
and the HTTP server (serve)."""
