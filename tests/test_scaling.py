"""scaling.py: the IsoFLOP fit recovers known exponents, flags off-centre grids, and a sweep resumes instead
of retraining (sweep.py)."""

import json
import os

import numpy as np
import pytest

import scaling
from conftest import run_main, run_script


def synthetic_rows(alpha, beta, budgets, ratio=1.4, sizes=7, E=1.69, A=406.4, B=410.7):
    """Sweep rows whose final loss is L(N, D) = E + A / N^alpha + B / D^beta with D = C / 6N (Chinchilla's
    form: the optimum has N_opt ~ C^(beta / (alpha + beta)), D_opt ~ C^(alpha / (alpha + beta))). The sizes
    come from one fixed geometric ladder, `sizes` of them around each budget's optimum, as a real ladder
    would give: not centred exactly."""
    ladder = 1e6 * ratio ** np.arange(60)
    rows = []
    for C in budgets:
        n = np.geomspace(1e6, 1e12, 4000)
        n_opt = n[np.argmin(A / n ** alpha + B / (C / (6 * n)) ** beta)]
        centre = int(np.argmin(abs(np.log(ladder / n_opt))))
        for N in ladder[centre - sizes // 2:centre + sizes // 2 + 1]:
            D = C / (6 * N)
            rows.append({'status': 'ok', 'budget': C, 'n_active': N, 'tokens': D,
                         'final': {'val_text_loss': E + A / N ** alpha + B / D ** beta}})
    return rows


@pytest.mark.parametrize('alpha,beta', [(0.34, 0.28), (0.30, 0.40)])
def test_isoflop_fit_recovers_known_exponents_from_synthetic_losses(alpha, beta):
    rows = synthetic_rows(alpha, beta, [1e18, 3e18, 1e19, 3e19, 1e20])
    f = scaling.fit(rows, 'val_text_loss', n_boot=50)
    assert abs(f['a'] - beta / (alpha + beta)) < 0.02, f['a']
    assert abs(f['b'] - alpha / (alpha + beta)) < 0.02, f['b']
    assert not f['edge_budgets']
    assert f['interval']['a_90'][0] <= f['a'] <= f['interval']['a_90'][1]


def test_the_bootstrap_interval_covers_the_true_exponent_of_noisy_losses():
    rows = synthetic_rows(0.34, 0.28, [1e18, 3e18, 1e19, 3e19, 1e20])
    rng = np.random.default_rng(0)
    for r in rows:
        r['final']['val_text_loss'] += rng.normal(0, 0.003)
    lo, hi = scaling.fit(rows, 'val_text_loss', n_boot=200)['interval']['a_90']
    assert lo < 0.28 / 0.62 < hi and hi - lo < 0.1


def test_a_minimum_outside_the_grid_is_flagged_as_an_edge():
    rows = synthetic_rows(0.34, 0.28, [1e19], sizes=5)
    n_opt = scaling.fit(rows, 'val_text_loss', n_boot=0)['budgets'][0]['N_opt']
    small = [r for r in synthetic_rows(0.34, 0.28, [1e19], sizes=25) if r['n_active'] < n_opt / 1.5][-5:]
    m = scaling.budget_minima({1e19: [(r['n_active'], r['tokens'], r['final']['val_text_loss']) for r in small]})
    assert m[1e19]['edge']
    centred = scaling.budget_minima({1e19: [(r['n_active'], r['tokens'], r['final']['val_text_loss'])
                                            for r in rows]})
    assert not centred[1e19]['edge']


def test_each_budget_grid_is_the_ladder_window_around_the_predicted_optimum():
    cfg = {'sizes': 3, 'tokens_per_param': 20.0}
    rungs = [(d, None, n, n, 6 * n) for d, n in enumerate(np.geomspace(1e5, 1e7, 8))]
    # 1e13 FLOPs at 20 tokens a parameter: N = sqrt(1e13 / 120) = 2.9e5, nearest rung 2 (3.7e5)
    assert scaling.grid(1e13, rungs, cfg) == [1, 2, 3]
    assert scaling.grid(1e30, rungs, cfg) == [5, 6, 7]          # clipped at the ladder's end


def test_every_run_takes_the_same_steps_its_batch_from_its_tokens():
    cfg = {'block_size': 256, 'grad_accum': 1, 'nproc': 1, 'steps': 500, 'max_batch': 64}
    assert scaling.batch_rule(6.4e6, cfg) == 50
    assert scaling.batch_rule(3.8e5, cfg) == 3
    assert scaling.batch_rule(1e3, cfg) == 1 and scaling.batch_rule(1e12, cfg) == 64


def test_the_ladder_keeps_the_aspect_ratio_and_head_size():
    s = scaling.shape(5, {'aspect': 32, 'head_dim': 32})
    assert s == dict(n_layer=5, d_model=160, n_head=5, n_kv_head=5, d_ff=480)


TINY = ['--budgets=5e9,1.5e10', '--depths=2,3,4', '--sizes=3', '--extend=0', '--n_boot=20', '--encoder=pixel',
        '--n_images=256', '--mixture=text=0.5,caption2image=0.5', '--steps=4', '--max_batch=2', '--eval_batches=1']


@pytest.mark.slow
def test_a_killed_sweep_reads_back_its_finished_runs_and_trains_only_what_is_missing(tmp_path):
    r = run_script('scaling.py', *TINY, f'--out_dir={tmp_path}', timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '6 to train' in r.stdout
    results = tmp_path / 'modality' / 'runs.jsonl'
    rows = [json.loads(line) for line in open(results)]
    assert len(rows) == 6 and all(row['status'] == 'ok' for row in rows)
    assert {'n_active', 'n_total', 'tokens', 'flops', 'train_s', 'final'} <= set(rows[0])
    assert rows[0]['final']['val_caption_loss'] > 0
    summary = json.load(open(tmp_path / 'scaling_modality.json'))
    assert set(summary['fits']) == {'language', 'vision'} and (tmp_path / 'scaling_modality.png').stat().st_size
    logs = {p: os.path.getmtime(p) for p in tmp_path.glob('modality/*/log.jsonl')}

    # as if killed during the last run: its row and its checkpoint are missing; the finished runs are read back
    last = rows[-1]['name']
    with open(results, 'w') as f:
        f.writelines(json.dumps(row) + '\n' for row in rows[:-1])
    (tmp_path / 'modality' / last / 'ckpt.pt').unlink()
    r = run_script('scaling.py', *TINY, f'--out_dir={tmp_path}')
    assert r.returncode == 0 and '1 to train' in r.stdout
    assert all(os.path.getmtime(p) == t for p, t in logs.items() if last not in str(p))
    again = {row['name']: row for row in map(json.loads, open(results))}
    assert again[last]['final'] == rows[-1]['final']               # the same run, retrained from scratch


def test_scaling_refuses_knobs_it_sets_per_run():
    r = run_main('scaling.py', '--n_layer=4')
    assert r.returncode != 0 and 'sets n_layer for each run' in r.stderr and 'Traceback' not in r.stderr
