"""
Sweeps of ordinary train.py runs, shared by scaling.py and study.py: each run in its own out dir under the
sweep's folder, one results file (JSON lines) for the whole sweep, resumable and idempotent.

    runs = [Run('d4-C1e13', {'n_layer': 4, 'd_model': 128, 'max_iters': 610}, cost=1e13, meta={...}), ...]
    rows = run_sweep(runs, 'out-scaling/modality')      # trains what is not finished yet, reads back the rest

A run is finished when the results file (runs.jsonl in the folder) holds a row with its name and exactly its
arguments: that row is read back and nothing runs. Otherwise the run trains in its own folder (resuming its
own checkpoint when one from the same arguments is there, so a killed sweep loses at most the steps since the
run's last checkpoint), is scored by eval.py when the run has eval flags, and its row is appended. A run whose
folder holds another configuration's files has them moved aside (`<name>.stale`), never mixed in.

Runs are subprocesses, exactly as a user starts them: `python train.py --key=value ...`, or with nproc > 1
`torchrun --standalone --nproc_per_node=nproc train.py ...`, so every run uses every process. A run that fails
is recorded as failed with the last line it printed (the log is in its folder) and the sweep goes on; the next
invocation tries it again.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from configurator import json_line

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = 'runs.jsonl'


@dataclass
class Run:
    name: str                 # its folder under the sweep's, and its key in the results file
    args: dict                # train.py knobs (out_dir is set by the sweep)
    cost: float = 1.0         # its share of the sweep's progress bar (FLOPs, steps, ...)
    evaluate: list = None     # eval.py flags to score the run's checkpoint with (None: not scored)
    meta: dict = field(default_factory=dict)  # copied into its row (budget, parameter counts, arm labels, ...)


def git_commit():
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


def read_results(folder):
    """{run name: its last row} from a sweep folder's results file (empty if there is none yet)."""
    path = os.path.join(folder, RESULTS)
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    rows[row['name']] = row
    return rows


def last_val(log_path):
    """The last held-out entry (the one with val_* losses) of a train.py log.jsonl, or None."""
    if not os.path.exists(log_path):
        return None
    entry = None
    with open(log_path) as f:
        for line in f:
            e = json.loads(line)
            if 'val_text_loss' in e:
                entry = e
    return entry


def last_step(log_path):
    """The last step a train.py log.jsonl has reached (0 if none yet): the running run's progress."""
    try:
        with open(log_path, 'rb') as f:
            f.seek(max(0, os.path.getsize(log_path) - 4096))
            tail = f.read().decode(errors='replace').strip().splitlines()
        return json.loads(tail[-1])['step'] if tail else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def command(script, argv, nproc):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    return [*launcher, script, *argv]


def as_flags(args):
    return [f'--{k}={v}' for k, v in args.items()]


def prepare_folder(run_dir, identity):
    """The run's folder, holding this configuration's files only: another configuration's are moved aside.
    Returns True if a checkpoint of this configuration is there to resume."""
    spec = os.path.join(run_dir, 'run.json')
    if os.path.exists(spec):
        with open(spec) as f:
            if json.load(f) != identity:
                aside = run_dir.rstrip('/') + '.stale'
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(run_dir, aside)
                tqdm.write(f"{run_dir} held a run of other settings: moved to {aside}")
    os.makedirs(run_dir, exist_ok=True)
    with open(spec, 'w') as f:
        json.dump(identity, f, indent=1)
    if os.path.exists(os.path.join(run_dir, 'ckpt.pt')):
        return True
    for stale in ('log.jsonl', 'train_s.json'):  # a start from scratch: no lines of an earlier attempt
        if os.path.exists(os.path.join(run_dir, stale)):
            os.remove(os.path.join(run_dir, stale))
    return False


def execute(cmd, log_path, poll, cwd=HERE):
    """Run cmd with its output in log_path, calling poll() every second; -> (exit status, last line printed)."""
    with open(log_path, 'a') as log:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            while p.poll() is None:
                poll()
                try:
                    p.wait(timeout=1.0)   # returns as soon as the run ends, not on the next whole second
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:
            p.terminate()  # Ctrl-C or a crash here: train.py saves on SIGTERM and exits; the rerun resumes
            p.wait()
            raise
    with open(log_path, errors='replace') as f:
        lines = [s.strip() for s in f.read().replace('\r', '\n').splitlines() if s.strip()]
    return p.returncode, (lines[-1] if lines else '')


def train_and_score(run, run_dir, nproc, bar, label):
    """Train one run (resuming its checkpoint if there is one) and score it; -> its row."""
    args, evaluate = {**run.args, 'out_dir': run_dir}, run.evaluate
    identity = {'args': args, 'eval': evaluate}
    resume = prepare_folder(run_dir, identity)
    log_path = os.path.join(run_dir, 'log.jsonl')
    max_iters, base = run.args['max_iters'], bar.n

    def poll():
        frac = min(1.0, last_step(log_path) / max_iters)
        bar.n = base + run.cost * frac
        bar.set_postfix_str(f"{label}: step {int(frac * max_iters)}/{max_iters}", refresh=True)

    row = {'name': run.name, 'args': run.args, 'eval_args': evaluate, **run.meta}
    timing = os.path.join(run_dir, 'train_s.json')  # wall time of the training, summed over its attempts
    val = last_val(log_path)
    if not (resume and val and val['step'] == max_iters):  # not trained to the end yet
        flags = as_flags(args) + (['--init_from=resume'] if resume else [])
        t0 = time.time()
        rc, last = execute(command('train.py', flags, nproc), os.path.join(run_dir, 'train.log'), poll)
        spent = time.time() - t0 + (json.load(open(timing)) if resume and os.path.exists(timing) else 0.0)
        with open(timing, 'w') as f:
            json.dump(spent, f)
        if rc != 0:
            return {**row, 'status': 'failed', 'error': last, 'log': os.path.join(run_dir, 'train.log')}
        val = last_val(log_path)
    row['train_s'] = json.load(open(timing)) if os.path.exists(timing) else None
    row['final'] = {k: v for k, v in val.items() if k.startswith('val_')}
    speeds = [e['tokens_per_s'] for e in map(json.loads, open(log_path)) if 'tokens_per_s' in e]
    row['tokens_per_s'] = sorted(speeds)[len(speeds) // 2] if speeds else None
    if evaluate is not None:
        bar.set_postfix_str(f"{label}: eval.py", refresh=True)
        out = os.path.join(run_dir, 'eval.json')
        t1 = time.time()
        rc, last = execute(command('eval.py', [f'--ckpt={run_dir}/ckpt.pt', f'--out={out}', *evaluate], 1),
                           os.path.join(run_dir, 'eval.log'), lambda: None)
        if rc != 0:
            return {**row, 'status': 'failed', 'error': last, 'log': os.path.join(run_dir, 'eval.log')}
        row['eval_s'] = time.time() - t1
        with open(out) as f:
            row['eval'] = json.load(f)
    return {**row, 'status': 'ok'}


def run_sweep(runs, folder, nproc=1, unit='FLOP', desc='sweep'):
    """Train (and score, where a run has eval flags) every run that is not finished; -> the rows of all runs,
    in the order given. Progress: one bar over the sweep's cost, with the run in progress, its
    step, and an ETA."""
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique within a sweep: {names}")
    os.makedirs(folder, exist_ok=True)
    done = read_results(folder)
    finished = lambda r: (done.get(r.name, {}).get('status') == 'ok' and done[r.name]['args'] == r.args
                          and done[r.name].get('eval_args') == r.evaluate)
    todo = [r for r in runs if not finished(r)]
    print(f"{desc}: {len(runs)} runs, {len(runs) - len(todo)} finished and read back, {len(todo)} to train")
    total = sum(r.cost for r in runs)
    bar = tqdm(total=total, initial=total - sum(r.cost for r in todo), unit=unit, unit_scale=True,
               desc=desc, dynamic_ncols=True, smoothing=0.0)
    with bar:
        for i, run in enumerate(todo):
            label = f"run {i + 1} of {len(todo)} ({run.name})"
            start = bar.n
            row = train_and_score(run, os.path.join(folder, run.name), nproc, bar, label)
            bar.n = start + run.cost
            bar.refresh()
            if row['status'] != 'ok':
                tqdm.write(f"{run.name} failed: {row['error']} (log: {row['log']})")
            with open(os.path.join(folder, RESULTS), 'a') as f:
                f.write(json_line(row) + '\n')
            done[run.name] = row
    return [done[r.name] for r in runs]
