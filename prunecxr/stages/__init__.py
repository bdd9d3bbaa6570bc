"""The stages users run, each an MLflow run opened by one kernel (kernel.py): train, prune and
sweep, analyze, and study, which drives the others (docs/ARCHITECTURE.md)."""
