"""Kernels stage (``vstream.kernels``): Triton kernels of the memory's compression steps,
each beside its PyTorch reference, and the dispatch between them."""
