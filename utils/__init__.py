"""Helpers shared by train.py and sample.py: checkpoints, distributed setup, logging, images."""
