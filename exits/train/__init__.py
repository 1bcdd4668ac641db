"""Stage-1 training on Ray Train: 1a similarity-extractor warm-up, 1b EXITS generator."""
