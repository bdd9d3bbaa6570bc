"""prunecxr: how pruning affects long-tailed multi-label chest X-ray classifiers (Holste et al., 2023)."""

__version__ = "0.1.0"


class PrunecxrError(Exception):
    """An input or setting the user can fix; the CLI prints it as one line and exits non-zero."""
