"""The paper's method in pure torch: point retrieval (Eq. 2-5), similarity sources, losses
(Eq. 1, 6-10) and the CRF. Knows tensors, not datasets or training loops."""
