"""Trainer entry: ``python -m agora.trainer`` streams data and drives it through the pipeline."""
