"""GPU tier: the fast paths against the plain path on a CUDA device (marker ``gpu``)."""
