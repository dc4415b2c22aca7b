"""Optimizer step benchmarks: ``python -m autolr_fused.bench`` (see ``run.py``)."""
