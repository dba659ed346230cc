"""The runtime: decoder, policies, FiRST routers, sampling, generation and tokenizer.

Imports no torch, no evaluation or training code and no argparse (``tests/test_layers.py``).
"""
