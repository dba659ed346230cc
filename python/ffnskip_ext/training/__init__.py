"""Training: FiRST layer routers on a frozen model, and the PyTorch reference of the engine's
routing (needs torch)."""
