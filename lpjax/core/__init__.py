"""The algorithm: methods, schedules, per-stage update rules, staging, losses and optimizers.

Nothing here knows about devices, runs or files (tests/test_layers.py holds the import rules)."""
