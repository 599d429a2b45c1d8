"""
Batches built ahead of the step, in background processes: data off the step's critical path.

    batches = Loader(dataset, start=step + skipped, grad_accum=2, world=2, rank=0, workers=2, pin=True)
    position, micro, batch = next(batches)      # the batch train.py would have built for (position, micro)

A batch is a pure function of (seed, split, position, index) (data.WorldData.get), so worker processes can
build the next ones while the model trains on this one, and a resumed run asks for the same sequence from its
saved position: the i-th item is the micro-batch `i % grad_accum` of position `start + i // grad_accum`, at
global index micro * world + rank, exactly train.py's order. torch's DataLoader keeps the order whatever the
number of workers; each worker uses one thread (the main process's matmuls have the cores). With workers=0
the batches are built in the loop, as without a loader.
"""

import itertools

import torch
from torch.utils.data import DataLoader, Dataset


class Positions(Dataset):
    """Item i -> (position, micro, the batch of that micro-step on this rank)."""

    def __init__(self, dataset, start, grad_accum, world, rank):
        self.dataset, self.start, self.grad_accum, self.world, self.rank = dataset, start, grad_accum, world, rank

    def key(self, i):
        position, micro = self.start + i // self.grad_accum, i % self.grad_accum
        return position, micro, micro * self.world + self.rank

    def __getitem__(self, i):
        position, micro, index = self.key(i)
        return position, micro, self.dataset.get('train', position, index)


def one_thread(_):
    torch.set_num_threads(1)


class Loader:
    """An endless, ordered iterator over (position, micro, Batch) from `start` on."""

    def __init__(self, dataset, start, grad_accum=1, world=1, rank=0, workers=0, pin=False, prefetch=2):
        items = Positions(dataset, start, grad_accum, world, rank)
        if workers == 0:
            self.it = ((p, m, b.pin_memory() if pin else b) for p, m, b in (items[i] for i in itertools.count()))
        else:
            self.it = iter(DataLoader(items, batch_size=None, sampler=itertools.count(), num_workers=workers,
                                      prefetch_factor=prefetch, pin_memory=pin, worker_init_fn=one_thread,
                                      persistent_workers=True))

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.it)
