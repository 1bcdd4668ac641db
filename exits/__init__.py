"""EXITS: extreme-point supervised instance segmentation on Ray."""

__version__ = "0.1.0"
