"""What tests and benchmarks share: toy models, checkpoint writers, subprocess loads, memory readings.

Tests find it through pytest's ``pythonpath`` setting (``tests``); subprocesses
get ``PYTHONPATH=tests``; benchmarks put ``tests`` on ``sys.path`` once, at the top.
"""
