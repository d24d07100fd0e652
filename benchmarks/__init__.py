"""Benchmarks and studies: scripts at the top of the import layers (they may use every package, nothing imports
them). Most run as files, `python benchmarks/NAME.py`; phema_sweep runs as `python -m benchmarks.phema_sweep`."""
