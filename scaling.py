"""
IsoFLOP scaling laws for the language and the diffusion loss (docs/paper.md §7), at your own scale.

    python scaling.py                    # the CPU preset, per-modality FFN (the paper's dense model): ~1 h on 2 cores
    python scaling.py --ffn=moe          # the same sweep with the fine-grained MoE at equal active parameters
    python scaling.py --preset=gpu --nproc=8     # larger budgets; every run on all 8 GPUs (torchrun)
    python scaling.py --fit_only=True    # fit and plot what out_dir holds, train nothing

For each compute budget C and each model of a ladder (depth L, width aspect * L, heads of head_dim, SwiGLU of
3 * width), one ordinary train.py run of D = C / F(N) tokens, where F is the 6N convention's FLOPs per token
(model.flops_per_token: 6 N + 12 n_layer d_model T, N = active parameters; the paper's IsoFLOP sweeps take
D = C / 6N, docs/paper.md §7; bench.py also reports the FLOPs that execute, which are fewer):
max_iters = C / (F * tokens per step). Then, separately for the
held-out text loss (language) and the held-out caption->image diffusion loss (vision): per budget a parabola
of the final loss in log N and in log D, their minima N_opt and D_opt, and power laws N_opt ~ C^a,
D_opt ~ C^b, with a bootstrap over runs for intervals. A budget whose minimum lies at its grid's edge gets
the next ladder size beyond it (up to `extend` more), and is flagged if it still does.

The rule for each run (stated once, here): every run takes `steps` optimizer steps, its batch D / (block_size
* steps) rows (rounded; at most max_batch), so a small model trains on its many tokens in big batches and a
large one on its few in small ones (with one batch for every size, the largest models of a budget got ~100
steps and the smallest 3,000; with powers of two, neighbouring sizes jumped between 8 and 64 rows); learning
rate = lr_ref * sqrt(d_ref / d_model) with d_ref = 256, the default model's width, where lr_ref = 1e-3 is the
default run's rate; warmup = min(100, max_iters / 10); cosine to a tenth of the peak at the last step. Every
run uses train.py's other defaults (encoder, seed, ...) and the preset's mixture; any train.py knob given here
applies to every run.

Each sweep lives in out_dir/<ffn>/ (one folder per run, runs.jsonl with every run's row: config, N active
and total, tokens, FLOPs, wall time, final held-out losses); the fit goes to out_dir/scaling_<ffn>.json and
out_dir/scaling_<ffn>.png, and out_dir/scaling.json gathers every sweep in out_dir with the exponent table.
A finished run is read back, never rerun; a killed sweep continues where it stopped.
"""

import json
import math
import os
import sys

import numpy as np
import torch

import pipeline
import rae
import train
from configurator import configure, fail, finite_or_null, knobs
from model import Transfusion
from sweep import Run, git_commit, read_results, run_sweep

# -----------------------------------------------------------------------------
preset = 'cpu'            # cpu | gpu: budgets, ladder, batch and mixture (PRESETS; a flag overrides any of them)
budgets = '4e12,1.3e13,4e13'  # FLOP budgets C, comma-separated (PRESETS: ffn=moe has its own)
depths = '1,2,3,4,5,6,7,8'  # the ladder: depths L (width aspect * L); each budget takes `sizes` of them
aspect = 32               # d_model per layer
head_dim = 32             # n_head = d_model / head_dim (as many key/value heads)
sizes = 5                 # ladder points per budget, centred on the predicted optimum
tokens_per_param = 10.0   # where the grid is centred: D / N = this (between the language and vision optima here)
extend = 2                # a budget whose minimum lies at its grid's edge gets up to this many more sizes
lr_ref = 1e-3             # the peak learning rate at d_model = 256 (the rule scales it by sqrt(256 / d_model))
steps = 500               # optimizer steps of every run: the batch follows from the run's tokens
max_batch = 256           # rows per step at most (per process)
nproc = 1                 # processes per run (> 1: torchrun --standalone --nproc_per_node=nproc)
out_dir = 'out-scaling'   # one folder per sweep (out_dir/<ffn>), the fits and figures beside them
fit_only = False          # True: fit and plot the runs already in out_dir, train nothing
n_boot = 1000             # bootstrap resamples of the runs for the intervals on a and b
# -----------------------------------------------------------------------------
# Text and caption->image documents, half the tokens each (the default mixture gives text 4% of its tokens: the
# language optimum then lies below the smallest model, docs/scaling.md). 'moe': what changes with
# ffn=moe: an MoE step costs ~1.6x a dense one on a CPU, so its CPU sweep has 4 sizes a budget, a little less
# compute (both about an hour on 2 cores).
PRESETS = {
    'cpu': dict(budgets='4e12,1.3e13,4e13', depths='1,2,3,4,5,6,7,8', steps=500, eval_batches=16,
                mixture='text=0.6,caption2image=0.4', moe=dict(budgets='3e12,1e13,3e13', sizes=4)),
    'gpu': dict(budgets='1e15,3e15,1e16,3e16', depths='2,3,4,5,6,7,8,10,12,14,16', steps=2000, max_batch=512,
                eval_batches=32, mixture='text=0.6,caption2image=0.4', moe={}),
}
PER_RUN = ('n_layer', 'd_model', 'n_head', 'n_kv_head', 'd_ff', 'batch_size', 'max_iters', 'warmup_iters',
           'learning_rate', 'min_lr', 'lr_decay_iters', 'eval_interval', 'out_dir', 'init_from', 'meta')  # per run
LOSSES = {'language': 'val_text_loss', 'vision': 'val_flow_loss'}
D_REF = 256
# the paper's IsoFLOP exponents (docs/paper.md §7) and Chinchilla's
PAPER = {'modality': {'language': (0.47, 0.53), 'vision': (0.37, 0.63)},
         'moe': {'language': (0.41, 0.59), 'vision': (0.36, 0.64)}}
CHINCHILLA = (0.49, 0.51)


# -----------------------------------------------------------------------------
# the ladder and the runs


def shape(depth, cfg):
    d = cfg['aspect'] * depth
    heads = d // cfg['head_dim']
    return dict(n_layer=depth, d_model=d, n_head=heads, n_kv_head=heads, d_ff=3 * d)


def size_rule(depth, max_iters, cfg):
    """The learning rate and schedule of one size (the module docstring states the rule)."""
    lr = cfg['lr_ref'] * math.sqrt(D_REF / (cfg['aspect'] * depth))
    return dict(learning_rate=lr, min_lr=lr / 10, warmup_iters=min(100, max(1, max_iters // 10)))


def ladder(cfg, tok, encoder):
    """[(depth, its model shape, N active, N total, FLOPs per token)] for every depth of the ladder, counted on
    the meta device (nothing allocated)."""
    out = []
    for depth in (int(x) for x in cfg['depths'].split(',')):
        s = shape(depth, cfg)
        mcfg = pipeline.model_config({**cfg, **s}, tok, encoder.d_latent, encoder.n_tokens)
        with torch.device('meta'):
            m = Transfusion(mcfg)
        counts = m.count_params()
        out.append((depth, s, counts['active'], counts['total'], m.flops_per_token()))
    return out


def grid(C, rungs, cfg):
    """Indices of the `sizes` rungs nearest (in log N) to the optimum the centring rule predicts for C,
    D = tokens_per_param * N with C = 6 N D."""
    guess = math.sqrt(C / (6 * cfg['tokens_per_param']))
    centre = min(range(len(rungs)), key=lambda i: abs(math.log(rungs[i][2] / guess)))
    lo = max(0, min(centre - cfg['sizes'] // 2, len(rungs) - cfg['sizes']))
    return list(range(lo, min(len(rungs), lo + cfg['sizes'])))


def budget_tag(C):
    m, e = f"{C:.2e}".split('e')
    return f"{float(m):g}e{int(e)}"


def batch_rule(tokens, cfg):
    """Rows per step (per process): tokens / (block_size * steps * processes), rounded, in [1, max_batch]."""
    rows = tokens / (cfg['block_size'] * cfg['grad_accum'] * cfg['nproc'] * cfg['steps'])
    return int(min(cfg['max_batch'], max(1, round(rows))))


def make_run(C, rung, cfg, passthrough):
    depth, s, n_active, n_total, fpt = rung
    rows = batch_rule(C / fpt, cfg)
    tokens_per_step = rows * cfg['block_size'] * cfg['grad_accum'] * cfg['nproc']
    iters = max(1, round(C / (fpt * tokens_per_step)))
    args = {**passthrough, **s, 'batch_size': rows, 'max_iters': iters, 'eval_interval': iters,
            **size_rule(depth, iters, cfg)}
    tokens = iters * tokens_per_step
    meta = {'budget': C, 'depth': depth, 'd_model': s['d_model'], 'n_active': n_active, 'n_total': n_total,
            'flops_per_token': fpt, 'tokens': tokens, 'flops': tokens * fpt}
    return Run(f"C{budget_tag(C)}_L{depth}", args, cost=tokens * fpt, meta=meta)


# -----------------------------------------------------------------------------
# the fit


def parabola_min(x, y):
    """Least-squares y = c2 x^2 + c1 x + c0 -> (x at its minimum, y there), or None if it is not convex."""
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
        return None
    xm = -c1 / (2 * c2)
    return xm, c0 - c1 * c1 / (4 * c2)


def power_law(C, y):
    """log y = e log C + k by least squares -> (e, k)."""
    e, k = np.polyfit(np.log(C), np.log(y), 1)
    return float(e), float(k)


def budget_minima(points):
    """points: {C: [(N, D, loss)]} -> {C: {N_opt, D_opt, loss_opt, edge}}: per budget, the parabolas of the
    loss in ln N and in ln D and their minima. edge: a parabola is not convex or its minimum does not lie
    strictly between the grid's smallest and largest model (off-centre grids bias the exponents). The fitted
    minimum, not the lowest point, decides: where the curve is flat, the lowest point is mostly noise."""
    out = {}
    for C, pts in sorted(points.items()):
        N, D, L = (np.array(v, dtype=float) for v in zip(*sorted(pts)))
        res = {'N_grid': N.tolist(), 'loss': L.tolist(), 'edge': True, 'N_opt': None, 'D_opt': None,
               'loss_opt': None}
        if len(N) >= 3:
            fn, fd = parabola_min(np.log(N), L), parabola_min(np.log(D), L)
            if fn and fd:
                res.update(N_opt=float(np.exp(fn[0])), D_opt=float(np.exp(fd[0])), loss_opt=float(fn[1]))
                res['edge'] = not (np.log(N[0]) < fn[0] < np.log(N[-1]) and np.log(D[-1]) < fd[0] < np.log(D[0]))
        out[C] = res
    return out


def exponents(minima):
    """Power laws through the budgets' minima: (a, b) of N_opt ~ C^a and D_opt ~ C^b, or None."""
    ok = [(C, m) for C, m in minima.items() if m['N_opt']]
    if len(ok) < 2:
        return None
    C = np.array([c for c, _ in ok])
    return power_law(C, [m['N_opt'] for _, m in ok])[0], power_law(C, [m['D_opt'] for _, m in ok])[0]


def bootstrap(points, n_boot, seed=0):
    """Intervals on a and b by a residual bootstrap: each budget's losses are replaced by its parabola's values
    plus residuals of that fit drawn with replacement (scaled by sqrt(n / (n - 3)) for the 3 fitted
    coefficients), the minima and power laws refitted; the 5th and 95th percentiles, and how many draws gave a
    fit. (Resampling the runs themselves leaves 3 of 5 distinct sizes in many draws, and parabolas through
    those put minima anywhere: intervals of [-6, 12].)"""
    rng = np.random.default_rng(seed)
    fits = {}
    for C, pts in points.items():
        N, D, L = (np.array(v, dtype=float) for v in zip(*sorted(pts)))
        if len(L) < 4:
            return None
        x = np.log(N)
        pred = np.polyval(np.polyfit(x, L, 2), x)
        fits[C] = N, D, pred, (L - pred) * np.sqrt(len(L) / (len(L) - 3))
    draws = []
    for _ in range(n_boot):
        sample = {C: list(zip(N, D, pred + rng.choice(res, len(res)))) for C, (N, D, pred, res) in fits.items()}
        ab = exponents(budget_minima(sample))
        if ab:
            draws.append(ab)
    if not draws:
        return None
    a, b = np.array(draws).T
    return {'a_90': np.percentile(a, [5, 95]).tolist(), 'b_90': np.percentile(b, [5, 95]).tolist(),
            'n_fits': len(draws), 'n_boot': n_boot}


def fit(rows, loss_key, n_boot=1000):
    """The IsoFLOP analysis of one loss over a sweep's rows (each with budget, n_active, tokens, final)."""
    points = {}
    for r in rows:
        if r.get('status') == 'ok' and r['final'].get(loss_key) is not None:
            points.setdefault(r['budget'], []).append((r['n_active'], r['tokens'], r['final'][loss_key]))
    minima = budget_minima(points)
    ab = exponents(minima)
    res = {'loss': loss_key, 'budgets': [{'C': C, **m} for C, m in minima.items()],
           'edge_budgets': [C for C, m in minima.items() if m['edge']]}
    if ab:
        res.update(a=ab[0], b=ab[1], a_plus_b=ab[0] + ab[1], interval=bootstrap(points, n_boot))
        ok = [(C, m) for C, m in minima.items() if m['N_opt']]
        res['N_law'] = power_law([C for C, _ in ok], [m['N_opt'] for _, m in ok])
        res['D_law'] = power_law([C for C, _ in ok], [m['D_opt'] for _, m in ok])
    return res


# -----------------------------------------------------------------------------
# the report: a figure, a table, JSON


def plot(rows, fits, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(fits), 3, figsize=(14, 4.2 * len(fits)), squeeze=False)
    budgets = sorted({r['budget'] for r in rows})
    colours = plt.cm.viridis(np.linspace(0, 0.85, len(budgets)))
    for (name, f), ax in zip(fits.items(), axes):
        for C, col in zip(budgets, colours):
            pts = sorted((r['n_active'], r['final'][f['loss']]) for r in rows
                         if r['budget'] == C and r.get('status') == 'ok')
            if not pts:
                continue
            N, L = np.array(pts).T
            ax[0].plot(N, L, 'o', color=col, label=f"C = {budget_tag(C)}")
            m = next(b for b in f['budgets'] if b['C'] == C)
            if len(N) >= 3:
                xs = np.linspace(np.log(N[0]), np.log(N[-1]), 50)
                ax[0].plot(np.exp(xs), np.polyval(np.polyfit(np.log(N), L, 2), xs), '-', color=col, lw=1)
            if m['N_opt']:
                ax[0].plot(m['N_opt'], m['loss_opt'], '*', color=col, ms=14, mec='k',
                           label='grid edge' if m['edge'] else None)
        ax[0].set(xscale='log', xlabel='active parameters N', ylabel=f"held-out {f['loss']}",
                  title=f"{name}: IsoFLOP curves and their minima")
        ax[0].legend(fontsize=8)
        ok = [b for b in f['budgets'] if b['N_opt']]
        for k, (key, law, letter) in enumerate((('N_opt', 'N_law', 'a'), ('D_opt', 'D_law', 'b'))):
            a = ax[k + 1]
            if not ok:
                a.text(0.5, 0.5, 'no budget has a minimum', ha='center', transform=a.transAxes)
                continue
            C = np.array([b['C'] for b in ok])
            a.plot(C, [b[key] for b in ok], 'o', color='C3')
            if law in f:
                e, c = f[law]
                cs = np.geomspace(C.min() / 1.5, C.max() * 1.5, 20)
                lo, hi = f['interval'][f'{letter}_90'] if f.get('interval') else (float('nan'),) * 2
                a.plot(cs, np.exp(c) * cs ** e, '-', color='C3',
                       label=f"{letter} = {e:.2f} (90%: {lo:.2f} to {hi:.2f})")
                a.legend(fontsize=9)
            a.set(xscale='log', yscale='log', xlabel='compute C (FLOPs)',
                  ylabel='N_opt (active parameters)' if key == 'N_opt' else 'D_opt (tokens)',
                  title=f"{name}: {key} ~ C^{letter}")
            a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # 2x10^13 ... overlapped
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(sweeps):
    """Exponent rows: ours per sweep and loss (with intervals), the paper's, Chinchilla's."""
    lines = [f"{'fit':40s} {'a':>6s} {'b':>6s} {'a+b':>6s}   90% intervals (a; b)"]
    for ffn, s in sweeps.items():
        for name, f in s['fits'].items():
            if 'a' not in f:
                lines.append(f"{f'ours, {ffn}, {name}':40s}  (fewer than 2 budgets with a minimum)")
                continue
            iv = f.get('interval') or {}
            ci = (f"{iv['a_90'][0]:.2f}-{iv['a_90'][1]:.2f}; {iv['b_90'][0]:.2f}-{iv['b_90'][1]:.2f}"
                  if iv else '')
            edge = '  (edge: ' + ', '.join(f'{c:.0e}' for c in f['edge_budgets']) + ')' if f['edge_budgets'] else ''
            lines.append(f"{f'ours, {ffn}, {name}':40s} {f['a']:6.2f} {f['b']:6.2f} {f['a_plus_b']:6.2f}   {ci}{edge}")
    for ffn, fits in PAPER.items():
        for name, (a, b) in fits.items():
            label = 'dense (per-modality FFN)' if ffn == 'modality' else 'MoE'
            lines.append(f"{f'paper, {label}, {name}':40s} {a:6.2f} {b:6.2f} {a + b:6.2f}")
    lines.append(f"{'Chinchilla, language':40s} {CHINCHILLA[0]:6.2f} {CHINCHILLA[1]:6.2f} {sum(CHINCHILLA):6.2f}")
    return '\n'.join(lines)


def report(cfg, rows, ffn):
    fits = {name: fit(rows, key, cfg['n_boot']) for name, key in LOSSES.items()}
    keep = ('name', 'status', 'budget', 'depth', 'd_model', 'n_active', 'n_total', 'tokens', 'flops',
            'flops_per_token', 'train_s', 'tokens_per_s', 'final', 'args')
    summary = {'ffn': ffn, 'commit': git_commit(), 'preset': cfg['preset'],
               'budgets': [float(c) for c in cfg['budgets'].split(',')], 'fits': fits,
               'paper': PAPER.get(ffn), 'chinchilla': CHINCHILLA,
               'wall_s': sum(r.get('train_s') or 0 for r in rows),
               'runs': [{k: r[k] for k in keep if k in r} for r in rows]}
    base = os.path.join(cfg['out_dir'], f'scaling_{ffn}')
    with open(base + '.json', 'w') as f:
        json.dump(finite_or_null(summary), f, indent=1)
    plot(rows, fits, base + '.png', f"IsoFLOP sweep, ffn={ffn} (scaling.py, preset {cfg['preset']})")
    sweeps = {}
    for name in sorted(os.listdir(cfg['out_dir'])):
        if name.startswith('scaling_') and name.endswith('.json'):
            with open(os.path.join(cfg['out_dir'], name)) as f:
                s = json.load(f)
            sweeps[s['ffn']] = s
    text = table(sweeps)
    with open(os.path.join(cfg['out_dir'], 'scaling.json'), 'w') as f:
        json.dump({'table': text.splitlines(), 'sweeps': sweeps}, f, indent=1)
    for name, f in fits.items():
        for C in f['edge_budgets']:
            print(f"warning: {name}: the minimum of budget {C:.0e} lies at its grid's edge (the exponents are "
                  f"biased): extend the ladder past it (--depths, --extend)", file=sys.stderr)
    print('\n' + text)
    print(f"wrote {base}.json, {base}.png and {os.path.join(cfg['out_dir'], 'scaling.json')}")


# -----------------------------------------------------------------------------


def plan(cfg, rungs, passthrough, rows_so_far):
    """The runs of the sweep: each budget's centred grid, plus, for a budget whose minimum (of either loss)
    lies at an edge of what has run, the next rung beyond that edge (up to `extend` more per budget)."""
    runs = {}
    for C in (float(c) for c in cfg['budgets'].split(',')):
        idx = grid(C, rungs, cfg)
        for extra in range(cfg['extend'] + 1):
            rows = [rows_so_far[n] for n in (make_run(C, rungs[i], cfg, passthrough).name
                                             for i in idx) if n in rows_so_far]
            if extra == cfg['extend'] or len(rows) < len(idx):
                break  # out of extensions, or the grid has not all run yet
            grow = set()
            for key in LOSSES.values():
                m = budget_minima({C: [(r['n_active'], r['tokens'], r['final'][key]) for r in rows
                                       if r.get('status') == 'ok' and r['final'].get(key) is not None]})[C]
                if m['edge']:  # extend toward the minimum: the fitted one, or the lowest point if not convex
                    low = (m['N_opt'] <= m['N_grid'][0] if m['N_opt'] is not None
                           else np.argmin(m['loss']) < len(m['loss']) / 2)
                    grow.add(idx[0] - 1 if low else idx[-1] + 1)
            grow = sorted(i for i in grow if 0 <= i < len(rungs))
            if not grow:
                break
            idx = sorted(set(idx) | set(grow))
        for i in idx:
            r = make_run(C, rungs[i], cfg, passthrough)
            runs[r.name] = r
    return list(runs.values())


def main(argv):
    name = next((a.split('=', 1)[1] for a in argv if a.startswith('--preset=')), preset)
    if name not in PRESETS:
        fail(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    own = knobs(globals())
    run = {**pipeline.run_knobs(), **knobs(vars(train))}
    sections = [('scaling (scaling.py)', list(own), __file__),
                ('every run (train.py; set per run here: ' + ', '.join(PER_RUN) + ')',
                 [k for k in knobs(vars(train)) if k not in PER_RUN], train.__file__), *pipeline.help_sections()]
    settings = {k: v for k, v in PRESETS[name].items() if k != 'moe'}
    cfg = configure({**run, **own, **settings}, argv, __doc__, sections)
    if cfg['ffn'] == 'moe':  # the preset's MoE values, where no flag set the knob
        cfg.update({k: v for k, v in PRESETS[name]['moe'].items() if not any(a.startswith(f'--{k}=') for a in argv)})
    for k in PER_RUN:
        if k != 'out_dir' and cfg[k] != run[k]:
            fail(f"scaling.py sets {k} for each run (the ladder and the size rule); set --depths, --aspect, "
                 f"--head_dim or --lr_ref instead")
    try:
        Cs = [float(c) for c in cfg['budgets'].split(',')]
        ds = [int(d) for d in cfg['depths'].split(',')]
    except ValueError:
        fail(f"budgets and depths must be comma-separated numbers, got {cfg['budgets']!r} and {cfg['depths']!r}")
    if min(Cs) <= 0 or min(ds) < 1 or ds != sorted(set(ds)):
        fail("budgets must be positive and depths positive integers in increasing order")
    if cfg['sizes'] < 3 or cfg['sizes'] > len(ds):
        fail(f"sizes must lie between 3 (a parabola) and the ladder's {len(ds)} depths, got {cfg['sizes']}")
    if cfg['aspect'] % cfg['head_dim'] or cfg['head_dim'] % 2 or cfg['extend'] < 0:
        fail("aspect must be a multiple of head_dim (an even number), extend not negative")
    if min(cfg['nproc'], cfg['steps'], cfg['max_batch']) < 1:
        fail("nproc, steps and max_batch must be at least 1")
    train.check_loop_knobs(cfg)
    tok, _ = pipeline.check(cfg)
    encoder = rae.build_encoder(cfg, fit=False)  # its shapes only: the first run builds (and caches) the RAE
    rungs = ladder(cfg, tok, encoder)
    ffn = cfg['ffn']
    passthrough = {k: cfg[k] for k in run if k not in PER_RUN and cfg[k] != run[k]}
    folder = os.path.join(cfg['out_dir'], ffn)
    if cfg['fit_only']:  # the rows of the runs this configuration plans, as they are on disk
        rows = read_results(folder)
        rows = {r.name: rows[r.name] for r in plan(cfg, rungs, passthrough, rows)
                if r.name in rows and rows[r.name]['args'] == r.args}
    else:
        rows = {}
        while True:  # an extension adds runs to the plan, until nothing is added
            runs = plan(cfg, rungs, passthrough, rows)
            if all(r.name in rows for r in runs):
                break
            out = run_sweep(runs, folder, nproc=cfg['nproc'], desc=f"IsoFLOP sweep ({ffn})")
            rows.update({r.name: row for r, row in zip(runs, out)})
    if not rows:
        fail(f"no finished runs of this configuration in {folder}: run the sweep first (without --fit_only)")
    report(cfg, list(rows.values()), ffn)


if __name__ == '__main__':
    main(sys.argv[1:])
