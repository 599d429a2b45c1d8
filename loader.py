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

Shards (shard_data.py) make the data stateful: the dataset is told the readers' layout (world x grad_accum
global micro indices, max(1, workers) positions each, so every reader lives in one worker) and where each
reader stands (`streams`, from a checkpoint); each batch carries the states of the readers it advanced. Data
that cannot be used (shards.DataError) comes out of next() as that error, one sentence, not a worker's traceback.
"""

import itertools

import torch
from torch.utils.data import DataLoader, Dataset

from shards import DataError


class Positions(Dataset):
    """Item i -> (position, micro, the batch of that micro-step on this rank)."""

    def __init__(self, dataset, start, grad_accum, world, rank):
        self.dataset, self.start, self.grad_accum, self.world, self.rank = dataset, start, grad_accum, world, rank

    def key(self, i):
        position, micro = self.start + i // self.grad_accum, i % self.grad_accum
        return position, micro, micro * self.world + self.rank

    def __getitem__(self, i):
        position, micro, index = self.key(i)
        try:
            return position, micro, self.dataset.get('train', position, index)
        except DataError as e:   # handed to the main process as it is (Loader.__next__ raises it)
            return position, micro, e


def one_thread(_):
    torch.set_num_threads(1)


class Loader:
    """An endless, ordered iterator over (position, micro, Batch) from `start` on."""

    def __init__(self, dataset, start, grad_accum=1, world=1, rank=0, workers=0, pin=False, prefetch=2, streams=None):
        if hasattr(dataset, 'start_streams'):
            dataset.start_streams(world * grad_accum, max(1, workers), streams)
        items = Positions(dataset, start, grad_accum, world, rank)
        if workers == 0:
            self.it = ((p, m, b.pin_memory() if pin and not isinstance(b, DataError) else b)
                       for p, m, b in (items[i] for i in itertools.count()))
        else:
            self.it = iter(DataLoader(items, batch_size=None, sampler=itertools.count(), num_workers=workers,
                                      prefetch_factor=prefetch, pin_memory=pin, worker_init_fn=one_thread,
                                      persistent_workers=True))

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.it)
        if isinstance(item[2], DataError):
            raise item[2]
        return item
