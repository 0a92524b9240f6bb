"""Inference: backends behind one small interface, normalisation, the motif head, the worker."""
