"""Settings for the whole pytest session."""

import torch


def pytest_configure(config) -> None:
    # The suite's networks are tiny: on a small shared machine torch's intra-op thread pool costs
    # more than it gains (test_sampler.py: 22 s -> 6 s with one thread). Subprocesses the tests
    # start (worker, torchrun, batch script) keep torch's default.
    torch.set_num_threads(1)
