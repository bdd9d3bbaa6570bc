"""The study's analyses (design §7): forgettability, co-occurrence/FCD, PIEs, figures, report."""
