"""The study's analyses (docs/ARCHITECTURE.md, "Analysis"): forgettability, co-occurrence and
FCD, PIEs, figures, report."""
