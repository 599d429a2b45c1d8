"""
Processes and sharding: what changes when train.py runs under torchrun (DDP, or FSDP2 with fsdp=True).

    run = setup(cfg)                   # a Setup: device, precision, ranks; the process groups
    run.after_rank0(build)             # rank 0 builds (the RAE, the latent caches) while the others wait
    model = build_model(mcfg, run)     # initialised from the seed; FSDP2 from the meta device; compiled per block
    stop = run.agree(stop)             # a flag every rank sees the same way (SIGTERM on any rank stops all)

FSDP2 (docs/design.md): the model is built on the meta device (no memory), each block is sharded with
fully_shard (one unit of all-gather / reduce-scatter) and so is the root, and only then are the parameters
materialised, each rank allocating its shard and initialising it (Transfusion.init_weights draws every
parameter from the seed by rows, so a shard gets exactly the rows the whole model would have): no rank ever
holds the whole model. Under bf16 the MixedPrecisionPolicy gathers bf16 parameters and reduces gradients in
fp32; the master weights and the optimizer stay fp32 and sharded.
"""

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from configurator import resolve_device
from model import Transfusion

BUILD_TIMEOUT = timedelta(hours=6)  # how long ranks wait for rank 0 to build the RAE and the latent caches


@dataclass
class Setup:
    """Where and how this process trains: what every step needs besides the model, its optimizer and data."""
    cfg: dict              # the run's knobs
    device: torch.device
    ctx: object            # the forward's precision context: bf16 autocast or nothing (configurator.precision)
    dtype: str = 'float32'  # the precision's name
    ddp: bool = False      # under torchrun: one of `world` processes
    rank: int = 0
    world: int = 1
    sharded: bool = False  # FSDP2 (else DDP) when ddp
    encoder: object = None  # encodes a batch's pending pictures on the device (data.encode_pending)
    cpu_group: object = None  # a gloo group for waits and flags: no GPU sync, and its own (long) timeout
    streams: dict = field(default_factory=dict)  # the last state of each shard reader this rank trained on

    def gather_streams(self):
        """{reader: state} of every rank's shard readers (each rank holds its own), for the checkpoint."""
        if not self.ddp:
            return dict(self.streams)
        parts = [None] * self.world
        dist.all_gather_object(parts, self.streams, group=self.cpu_group)
        return {k: v for part in parts for k, v in part.items()}

    def after_rank0(self, build):
        """Run build() on rank 0 first, then on the others (which then find its files): rank 0 builds caches
        that may take many minutes, so the others wait on the CPU group, whose timeout covers that, not on
        NCCL's default of 10 minutes."""
        if self.ddp and self.rank != 0:
            dist.barrier(group=self.cpu_group)
        out = build()
        if self.ddp and self.rank == 0:
            dist.barrier(group=self.cpu_group)
        return out

    def agree(self, flag):
        """True on every rank if it is True on any (a CPU collective: the GPU's queue is not drained)."""
        if not self.ddp:
            return bool(flag)
        t = torch.tensor([float(bool(flag))])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(t.item())


def setup(cfg):
    """-> Setup (precision unset). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK."""
    device = resolve_device(cfg['device'])
    if int(os.environ.get('RANK', -1)) == -1:
        return Setup(cfg, device, nullcontext())
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    if device.type == 'cuda':
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
        torch.cuda.set_device(device)
    world = int(os.environ['WORLD_SIZE'])
    return Setup(cfg, device, nullcontext(), ddp=True, rank=int(os.environ['RANK']), world=world,
                 sharded=cfg['fsdp'] and world > 1, cpu_group=dist.new_group(backend='gloo', timeout=BUILD_TIMEOUT))


def build_model(mcfg, run):
    """The model on run.device, initialised from cfg['seed'] (the same on every rank), compiled per block if
    asked, then FSDP2-sharded from the meta device (run.sharded) or whole."""
    seed = run.cfg['seed']
    if not run.sharded:
        with torch.device('meta'):
            model = Transfusion(mcfg)
        model.to_empty(device=run.device).init_weights(seed)
        return model.compile_blocks() if run.cfg['compile'] else model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard   # here: importing FSDP takes ~1 s
    with torch.device('meta'):
        model = Transfusion(mcfg)
    if run.cfg['compile']:
        model.compile_blocks()   # before fully_shard, as torchtitan does: the FSDP hooks stay outside the graphs
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if run.dtype == 'bfloat16' else MixedPrecisionPolicy())
    for blk in model.blocks:
        fully_shard(blk, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model.to_empty(device=run.device).init_weights(seed)
