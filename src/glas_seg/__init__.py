"""glas-seg: gland and nucleus instance segmentation for H&E histopathology."""

__version__ = "0.1.0"
