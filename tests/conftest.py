"""Shared pytest setup. One CPU thread: every tensor in these tests is tiny, and on a small shared
machine torch's thread pool made the suite over 20x slower (8 s -> 3 min measured)."""

import socket

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture
def dead_endpoint():
    """A 127.0.0.1 port where nothing listens -- what a download meets on a machine without a network:
    bound (so no one else takes it) but not listening, so connecting is refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
