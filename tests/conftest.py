"""Shared pytest setup. One CPU thread: every tensor in these tests is tiny, and on a small shared
machine torch's thread pool made the suite over 20x slower (8 s -> 3 min measured)."""

import torch

torch.set_num_threads(1)
