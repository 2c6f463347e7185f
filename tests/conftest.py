"""The test process computes with one torch thread.

The suite's tensors are small (tiny ViTs, resnet10t on 32-px crops, a few thousand features), where a
second OpenMP thread gains little, and the process shares two cores with DALI's threads, the runs it
starts and whatever else the machine runs: each parallel region then waits for a descheduled thread,
and 300 steps of a tiny MAE take ~10x as long with two threads as with one. Subprocesses get the same
(OMP_NUM_THREADS=1); `test_train.own_process_state` keeps one thread for in-process runs of train.py.
"""

import torch


def pytest_configure(config):
    torch.set_num_threads(1)
