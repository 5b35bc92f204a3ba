"""What several test files share: a host engine with one queue, and torch or a SKIP."""

import unittest

import ferry


class HostQueueCase(unittest.TestCase):
    """A host-transport engine (unpinned), a client and one queue, per test."""

    def setUp(self):
        self.engine = ferry.Engine(pinned=False)
        self.client = self.engine.new_client()
        self.queue = self.engine.open_queue(self.client)

    def tearDown(self):
        self.queue.close()
        self.engine.close()


def torch_or_skip(cuda=False):
    """torch, or a printed SKIP line and unittest.SkipTest when it (or, with `cuda`, a CUDA
    device) is missing."""
    try:
        import torch
    except ImportError:
        print("SKIP: torch is not installed")
        raise unittest.SkipTest("no torch")
    if cuda and not torch.cuda.is_available():
        print("SKIP: torch sees no CUDA device")
        raise unittest.SkipTest("no CUDA device")
    return torch
