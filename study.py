"""
The paper's four findings in miniature (docs/paper.md §6, §8): one command per study, a table for each.

    python study.py encoders     # (i)   pixel vs the in-repo vit vs DINOv2 latents, the same model and steps
    python study.py synergy      # (ii)  what text, image-text and QA data do for each other, at equal tokens
    python study.py world        # (iii) the share of action clips in a fixed budget: 0, 1, 10, 25, 100%
    python study.py moe          # (iv)  dense vs per-modality vs MoE; granularity; shared experts; v vs x
    python study.py all          # the four, one after the other
    python study.py moe --preset=gpu    # longer runs on bigger batches (the cpu preset: about an hour a study and seed)
    python study.py world --preset=quarter  # a quarter of the CPU steps (~3.5 min a world arm on 2 cores)
    python study.py all --report_only=True --out_dir=docs   # docs/study_*.md again from docs/study_*.json

Each arm is an ordinary train.py run that differs from its study's base in one factor, scored by eval.py
(the parts its study reads). Arms run through sweep.py, each in out_dir/<study>/<arm>/ with one results file
out_dir/<study>/runs.jsonl: a finished arm is read back, never rerun, and a killed study continues. The report
is out_dir/study_<study>.json (every arm's config, held-out losses and eval numbers, each comparison and its
verdict) and out_dir/study_<study>.md (the table beside the paper's numbers).

Noise. A comparison of two arms on one number is within its noise after one seed when the difference of a loss or
an error is below the seed-to-seed spread of this recipe (NOISE: relative, from the speedrun's repeated runs,
docs/speedrun.md), and always for an accuracy: the seed moves a score more than its binomial standard error over
the prompts or questions says (the default recipe's three runs answer 0.80 / 0.71 / 0.78 of 2,100 questions; the
MoE study's x-prediction arm got 0.22 then 0.03 of 32 prompts). Both arms of such a comparison are then trained
again with seed 2 (repeat=True), and so are those of any comparison that an arm's second seed puts within its
noise; the table shows both seeds. A difference is resolved when one seed puts a loss or an error beyond its
noise, or, with two seeds, when both agree on its sign and the mean difference exceeds each arm's own seed-to-seed
spread (and, for an accuracy, 2 binomial standard errors of the mean difference).
"""

import json
import math
import os
import sys

import numpy as np

import documents
import pipeline
import rae
import tokenizer
import train
from configurator import configure, fail, finite_or_null, knobs
from sweep import Run, git_commit, run_sweep

# -----------------------------------------------------------------------------
preset = 'cpu'            # cpu | quarter (a quarter of cpu's steps) | gpu (4x the steps of 4x the rows) | smoke
repeat = True             # train both arms of a comparison within its noise again with seed 2
out_dir = 'out-study'     # one folder per study, the reports beside them
dinov2_path = ''          # encoders: the DINOv2 checkpoint, a local folder ('' = facebook/dinov2-small, downloaded once)
nproc = 1                 # processes per run (> 1: torchrun --standalone --nproc_per_node=nproc)
arms = ''                 # comma-separated arms to run ('' = all of the study's), with the comparisons among them
report_only = False       # True: rewrite out_dir's study_<name>.md from its study_<name>.json, training nothing
# -----------------------------------------------------------------------------
STUDIES = ('encoders', 'synergy', 'world', 'moe')
# steps: a multiple of each arm's; eval: flags after the study's (a tiny scale for the tests)
SCALE = {'cpu': dict(steps=1, batch_size=8, eval=[]), 'quarter': dict(steps=0.25, batch_size=8, eval=[]),
         'gpu': dict(steps=4, batch_size=32, eval=[]),
         'smoke': dict(steps=0.01, batch_size=2, eval=['--n_batches=1', '--n_prompts=2', '--n_per_cell=1', '--steps=2',
                                                        '--n_rollouts=2', '--n_plans=1', '--plan_steps=2'])}
PER_ARM = ('max_iters', 'eval_interval', 'warmup_iters', 'seed', 'batch_size', 'out_dir', 'init_from', 'meta')
SEEDS = (1337, 2)
NO_CLIPS = 'text=0.1,caption2image=0.4,image2caption=0.15,qa=0.35'  # the default's mixture without its clips
# relative seed-to-seed spread of a number (docs/speedrun.md: e1 vs e1b, and the default recipe's 3 runs)
NOISE = {'loss': 0.03, 'error': 0.2, 'plan': 0.4}

# The numbers a table shows: (label, path in a row, kind, the path of its item count for accuracies).
# kinds: acc (higher is better, binomial noise), loss / error / plan (lower is better, relative noise).
METRICS = {
    'text': ('text nats/byte', 'eval.text_loss_per_byte', 'loss', None),
    'caption': ('caption ppl', 'eval.caption_ppl', 'loss', None),
    'diffusion': ('diffusion loss', 'eval.diffusion_loss_mean', 'loss', None),
    'gen': ('gen: 1 object right', 'eval.gen_1obj_seen.object', 'acc', 'eval_args.n_prompts'),
    'shape': ('gen: shape', 'eval.gen_1obj_seen.shape', 'acc', 'eval_args.n_prompts'),
    'qa': ('QA accuracy', 'eval.understanding.accuracy', 'acc', 'eval.understanding.n'),
    'ate': ('ATE (px)', 'eval.world_model.ate', 'error', None),
    'rpe': ('RPE (px)', 'eval.world_model.rpe', 'error', None),
    'plan': ('CEM error (px)', 'eval.planning.cem_position_error', 'plan', None),
    'clip': ('clip flow loss', 'final.val_action_flow_loss', 'loss', None),
}


def arm(name, label, steps, only=None, **args):
    """One arm: train.py knobs beside the study's base; `only`: the eval.py parts it is scored on, if not
    the study's."""
    return {'name': name, 'label': label, 'steps': steps, 'only': only, 'args': args}


def equal_tokens(kind, steps, mixture, ref_mixture, tok):
    """The steps that give `mixture` as many tokens of `kind` as `steps` steps of `ref_mixture`."""
    n_latent = rae.n_tokens(rae.KNOBS)
    share = documents.token_shares(mixture, tok, n_latent, 5)[kind]
    return round(steps * documents.token_shares(ref_mixture, tok, n_latent, 5)[kind] / share)


def encoders(cfg, tok):
    s = 800
    # DINOv2's latent is 384 wide: the model is 384 wide for every arm (the RAE width rule, docs/paper.md §6)
    base = dict(mixture=NO_CLIPS, d_model=384, n_head=12, n_kv_head=6, d_ff=1152)
    return dict(
        base=base, only='generation,understanding', eval=['--n_prompts=32', '--n_per_cell=40'],
        arms=[arm('pixel', 'pixel patches (8x8x3 = 192-d)', s, encoder='pixel'),
              arm('vit', 'vit, MAE-pretrained here (64-d)', s, encoder='vit'),
              arm('dinov2', 'DINOv2 ViT-S/14 (384-d)', s, encoder='dinov2', encoder_path=cfg['dinov2_path'])],
        columns=['text', 'diffusion', 'gen', 'shape', 'qa'],
        compare=[('vit', 'pixel', ['gen', 'qa', 'text']), ('dinov2', 'vit', ['gen', 'qa', 'text']),
                 ('dinov2', 'pixel', ['gen', 'qa'])],
        paper=("the semantic encoder wins both generation and understanding (SigLIP 2: DPG 0.59, GenEval 0.33, "
               "VQA 40.3; DINOv2-L 0.545 / 0.27 / 30.5; pixels v-pred 0.38 / 0.135 / 29.9; text PPL about equal)"),
        note="diffusion losses are in each encoder's own latent space: not comparable across arms")


def synergy(cfg, tok):
    s = 600
    tm, g1 = 'text=0.6,caption2image=0.2,image2caption=0.1,qa=0.1', 'caption2image=0.4,text=0.6'
    q1, q2 = 'qa=0.5,caption2image=0.25,image2caption=0.25', 'qa=0.5,text=0.5'
    return dict(
        base=dict(), eval=['--n_prompts=32', '--n_per_cell=40'],
        arms=[arm('text_only', '(a) text only', s, 'losses', mixture='text=1'),
              arm('text_mm', '(a) text + image-text, equal text tokens', equal_tokens('text', s, tm, 'text=1', tok),
                  'losses', mixture=tm),
              arm('t2i_only', '(b) caption->image only', s, 'generation', mixture='caption2image=1'),
              arm('t2i_text', '(b) caption->image + text, equal image tokens',
                  equal_tokens('caption2image', s, g1, 'caption2image=1', tok), 'generation', mixture=g1),
              arm('qa_only', '(c) QA only', s, 'understanding', mixture='qa=1'),
              arm('qa_imagetext', '(c) QA + image-text, equal QA tokens', equal_tokens('qa', s, q1, 'qa=1', tok),
                  'understanding', mixture=q1),
              arm('qa_text', '(c) QA + text, equal QA tokens', equal_tokens('qa', s, q2, 'qa=1', tok),
                  'understanding', mixture=q2)],
        columns=['text', 'caption', 'diffusion', 'gen', 'shape', 'qa'],
        compare=[('text_mm', 'text_only', ['text']), ('t2i_text', 't2i_only', ['diffusion', 'gen']),
                 ('qa_imagetext', 'qa_only', ['qa']), ('qa_text', 'qa_only', ['qa'])],
        paper=("(a) vision data costs little on in-domain text (DCLM PPL 13.84 text-only vs 13.76-13.98 with video "
               "or image-text); (b) text helps vision (0 -> 100B text tokens: diffusion loss 0.540 -> 0.512, "
               "GenEval 0.288 -> 0.354); (c) VQA 20B alone 34.6, + image-text 36.9, + text 37.9"),
        note="(a) reads the text columns, (b) diffusion and generation, (c) QA; each arm trains on as many "
             "tokens of its study's kind as the arm alone")


def world(cfg, tok):
    s = 1000
    others = {'text': 0.1, 'caption2image': 0.35, 'image2caption': 0.1, 'qa': 0.25}  # the default's, renormalised

    def mixture(p):
        rest = ''.join(f"{k}={(1 - p) * v / 0.8:.4g}," for k, v in others.items()) if p < 1 else ''
        return f"{rest}action={p:g}"
    shares = (0, 0.01, 0.1, 0.25, 1.0)
    return dict(
        base=dict(), only='world', eval=[],
        arms=[arm(f"clips_{round(100 * p)}", f"{100 * p:g}% action clips", s, mixture=mixture(p)) for p in shares],
        columns=['ate', 'rpe', 'plan', 'clip', 'text'],
        compare=[*[(f"clips_{round(100 * p)}", 'clips_100', ['ate', 'plan']) for p in shares[1:-1]],
                 ('clips_10', 'clips_1', ['ate', 'plan'])],
        paper=("50B NWM + 50B general data beats 100B NWM alone; over the NWM share of a 200B budget ATE goes "
               "1.80 (0.1%), 1.40 (0.5%), 1.22 (1%), 1.26 (10%), 1.24 (25%): saturating near 1%"),
        note="shares are of documents (a clip is ~4.7x a text-image document in tokens); the 0% arm never saw an "
             "action: its rollouts show what a model without them does")


def moe(cfg, tok):
    s = 600
    m = dict(ffn='moe', moe_d_expert=192)          # 4 active experts of 192 = one 768-wide FFN per token
    return dict(
        base=dict(mixture=NO_CLIPS), only='generation,understanding', eval=['--n_prompts=32', '--n_per_cell=40'],
        arms=[arm('dense', 'dense: one FFN for all tokens', s, ffn='dense'),
              arm('modality', 'per-modality FFNs (the default)', s, ffn='modality'),
              arm('moe_modality', 'MoE 14 routed + 2 per-modality shared, 4 active', s, **m, moe_experts=14,
                  moe_top_k=4, moe_shared='modality'),
              arm('moe_global', 'MoE 15 routed + 1 global shared, 4 active', s, **m, moe_experts=15, moe_top_k=4,
                  moe_shared='global'),
              arm('moe_none', 'MoE 16 routed, no shared, 4 active (G = 4)', s, **m, moe_experts=16, moe_top_k=4,
                  moe_shared='none'),
              arm('moe_g1', 'MoE G = 1: 4 experts of 768, top-1', s, ffn='moe', moe_d_expert=768, moe_experts=4,
                  moe_top_k=1, moe_shared='none'),
              arm('moe_g8', 'MoE G = 8: 32 experts of 96, top-8', s, ffn='moe', moe_d_expert=96, moe_experts=32,
                  moe_top_k=8, moe_shared='none'),
              arm('x_pred', 'per-modality FFNs, x-prediction', s, ffn='modality', flow_target='x')],
        columns=['text', 'caption', 'diffusion', 'gen', 'qa'],
        compare=[('modality', 'dense', ['text', 'diffusion']), ('moe_modality', 'modality', ['text', 'diffusion']),
                 ('moe_g8', 'moe_g1', ['text', 'diffusion']), ('moe_none', 'moe_g1', ['text', 'diffusion']),
                 ('moe_modality', 'moe_none', ['text', 'diffusion']), ('moe_global', 'moe_none', ['text', 'diffusion']),
                 ('x_pred', 'modality', ['diffusion', 'gen'])],
        paper=("MoE beats the dense split (stacking: PPL 15.13 -> 12.49, DPG 0.47 -> 0.63); granularity: vision "
               "saturates at G = 4, language at 16; shared experts none / global / per-modality: DCLM PPL 14.802 "
               "/ 14.794 / 14.785, GenEval 0.360 / 0.364 / 0.367; with RAE latents x-pred beats v-pred"),
        note="all MoE arms have 4 active experts of 192 (or one of 768, or 8 of 96) = one 768-wide FFN per token; "
             "G arms and the shared-expert arms hold 4 FFNs' worth of experts per layer (16 x 192)",
        extra=specialisation)


def specialisation(rows):
    """The per-layer expert table of the MoE arm with per-modality shared experts (eval.py's routing counts on
    held-out text, caption->image and image->caption batches; S >= 0.5 text, S <= -0.5 vision)."""
    table = value(rows['moe_modality'][0], 'eval.experts')
    if not table:
        return ''
    head = ['layer', *map(str, range(len(table)))]
    lines = ['Experts of the moe_modality arm by layer (14 routed + the 2 shared):', '',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for key, label in (('n_text', 'text'), ('n_vision', 'vision'), ('n_multimodal', 'multimodal'), ('n_dead', 'dead')):
        lines.append('| ' + ' | '.join([label, *(str(row[key]) for row in table)]) + ' |')
    return '\n'.join(lines) + '\n'


BUILD = {'encoders': encoders, 'synergy': synergy, 'world': world, 'moe': moe}


# -----------------------------------------------------------------------------
# numbers, noise and verdicts


def value(row, path):
    x = row
    for key in path.split('.'):
        if not isinstance(x, dict) or key not in x:
            return None
        x = x[key]
    return x


def count(row, metric):
    """How many prompts or questions an accuracy was measured on."""
    path = METRICS[metric][3]
    if path.startswith('eval_args.'):
        flag = f"--{path.split('.', 1)[1]}="
        return next((int(a[len(flag):]) for a in row.get('eval_args') or [] if a.startswith(flag)), 64)
    return value(row, path)


def within_noise(metric, rows_a, rows_b):
    """-> (resolved?, the mean difference a - b). rows_*: the arm's rows, one per seed."""
    kind = METRICS[metric][2]
    va = [value(r, METRICS[metric][1]) for r in rows_a]
    vb = [value(r, METRICS[metric][1]) for r in rows_b]
    if None in va or None in vb:
        return None, None
    diffs = [a - b for a, b in zip(va, vb)]
    mean_a, mean_b = np.mean(va), np.mean(vb)
    d = float(mean_a - mean_b)
    if kind == 'acc':
        var = lambda vs, rows: sum(v * (1 - v) / count(r, metric) for v, r in zip(vs, rows)) / len(vs) ** 2
        se = math.sqrt(var(va, rows_a) + var(vb, rows_b))       # of the difference of the two means
        beyond = abs(d) > 2 * max(se, 1e-12)
    else:
        beyond = abs(d) > NOISE[kind] * (abs(mean_a) + abs(mean_b)) / 2
    if len(diffs) == 1:                  # one seed never settles an accuracy (the module's docstring says why)
        return bool(beyond and kind != 'acc'), d
    spread = max(abs(va[0] - va[1]), abs(vb[0] - vb[1]))
    same_sign = all(x > 0 for x in diffs) or all(x < 0 for x in diffs)
    return bool(same_sign and abs(d) > spread and (beyond or kind != 'acc')), d


def verdicts(study, rows):
    """Every comparison of the study: metric, arms, the mean difference, seeds, resolved or not."""
    out = []
    for a, b, metrics in study['compare']:
        for m in metrics:
            resolved, d = within_noise(m, rows[a], rows[b])
            out.append({'a': a, 'b': b, 'metric': m, 'difference': d, 'seeds': min(len(rows[a]), len(rows[b])),
                        'resolved': resolved,
                        'better': None if d is None else (a if (d > 0) == (METRICS[m][2] == 'acc') else b)})
    return out


def to_repeat(study, rows):
    """The arms to train again with seed 2: both arms of each comparison within its noise, where they have one
    seed. Called until it names none, since an arm repeated for one comparison can unsettle another it is in."""
    return {a for v in verdicts(study, rows) if v['resolved'] is False for a in (v['a'], v['b'])
            if len(rows[a]) < len(SEEDS)}


# -----------------------------------------------------------------------------
# the runs and the report


def runs_of(name, study, cfg, passthrough, seeds_of):
    """The sweep.py runs of a study: every arm with its seeds (seeds_of: arm name -> list of seeds)."""
    scale = SCALE[cfg['preset']]
    runs = []
    for a in study['arms']:
        steps = max(2, round(a['steps'] * scale['steps']))
        for seed in seeds_of(a['name']):
            args = {**passthrough, **study['base'], **a['args'], 'batch_size': scale['batch_size'],
                    'max_iters': steps, 'eval_interval': max(1, steps // 4), 'warmup_iters': min(100, steps // 10),
                    'seed': seed}
            only = a['only'] or study.get('only', '')
            runs.append(Run(f"{a['name']}_s{seed}", args, cost=steps,
                            evaluate=[f'--only={only}', *study['eval'], *scale['eval']],
                            meta={'arm': a['name'], 'label': a['label'], 'study': name}))
    return runs


def cell(rows, metric):
    vals = [value(r, METRICS[metric][1]) for r in rows]
    fmt = (lambda v: f"{v:.3f}") if METRICS[metric][2] != 'loss' or 'ppl' in METRICS[metric][0] else \
        (lambda v: f"{v:.4f}")
    return ' / '.join('–' if v is None else fmt(v) for v in vals)


def markdown(name, study, rows, results):
    head = ['arm', 'steps', *[METRICS[m][0] for m in study['columns']]]
    lines = [f"### study: {name}", '', f"Paper: {study['paper']}.", '',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for a in study['arms']:
        r = rows[a['name']]
        lines.append('| ' + ' | '.join([a['label'], str(r[0]['args']['max_iters']),
                                        *[cell(r, m) for m in study['columns']]]) + ' |')
    seeds = f"two numbers: seeds {SEEDS[0]} / {SEEDS[1]}; " if any(len(r) > 1 for r in rows.values()) else ''
    lines += ['', f"({seeds}{study['note']})", '',
              '| comparison | number | difference | seeds | resolved |', '|---|---|---:|---:|---|']
    for v in results:
        d = '–' if v['difference'] is None else f"{v['difference']:+.4f}"
        res = {True: f"yes: {v['better']} better", False: 'no (within noise)', None: '–'}[v['resolved']]
        lines.append(f"| {v['a']} vs {v['b']} | {METRICS[v['metric']][0]} | {d} | {v['seeds']} | {res} |")
    extra = study['extra'](rows) if 'extra' in study else ''
    return '\n'.join(lines) + '\n' + ('\n' + extra if extra else '')


def train_arms(name, study, cfg, passthrough, seeds, folder, desc):
    """Every arm at its seeds (finished runs read back) -> {arm: [its rows, one per seed]}; stops on a failure."""
    runs = runs_of(name, study, cfg, passthrough, lambda a: seeds[a])
    rows = {}
    for r, row in zip(runs, run_sweep(runs, folder, nproc=cfg['nproc'], unit='step', desc=desc)):
        rows.setdefault(r.meta['arm'], []).append(row)
    failed = [r['name'] for rs in rows.values() for r in rs if r.get('status') != 'ok']
    if failed:
        fail(f"study {name}: {', '.join(failed)} failed (logs in {folder}); fix and rerun: finished arms are kept")
    return rows


def chosen_arms(study, names):
    """The study with only the named arms (names: comma-separated, '' = all) and the comparisons among them."""
    if not names:
        return study
    keep = set(names.split(','))
    unknown = keep - {a['name'] for a in study['arms']}
    if unknown:
        fail(f"no arm {', '.join(sorted(unknown))} in this study (its arms: "
             f"{', '.join(a['name'] for a in study['arms'])})")
    return {**{k: v for k, v in study.items() if k != 'extra'}, 'arms': [a for a in study['arms'] if a['name'] in keep],
            'compare': [c for c in study['compare'] if c[0] in keep and c[1] in keep]}


def run_study(name, cfg, tok, passthrough):
    study = chosen_arms(BUILD[name](cfg, tok), cfg['arms'])
    folder = os.path.join(cfg['out_dir'], name)
    seeds = {a['name']: [SEEDS[0]] for a in study['arms']}
    rows = train_arms(name, study, cfg, passthrough, seeds, folder, f"study {name}")
    while cfg['repeat'] and (again := to_repeat(study, rows)):
        seeds.update({a: list(SEEDS) for a in again})
        rows = train_arms(name, study, cfg, passthrough, seeds, folder, f"study {name}, seed 2 of the arms within noise")
    results = verdicts(study, rows)
    text = markdown(name, study, rows, results)
    report = {'study': name, 'commit': git_commit(), 'preset': cfg['preset'], 'paper': study['paper'],
              'note': study['note'], 'comparisons': results,
              'arms': [{'name': a['name'], 'label': a['label'],
                        'runs': [{k: r.get(k) for k in ('name', 'args', 'eval_args', 'train_s', 'eval_s', 'final',
                                                       'eval', 'tokens_per_s')} for r in rows[a['name']]]}
                       for a in study['arms']]}
    with open(os.path.join(cfg['out_dir'], f'study_{name}.json'), 'w') as f:
        json.dump(finite_or_null(report), f, indent=1)
    with open(os.path.join(cfg['out_dir'], f'study_{name}.md'), 'w') as f:
        f.write(text)
    print('\n' + text)
    print(f"wrote {os.path.join(cfg['out_dir'], f'study_{name}.json')} and .md")


def rewrite_report(name, cfg, tok):
    """study_<name>.md again from the committed study_<name>.json (report_only=True): the rows of every arm and
    seed as the study wrote them, the verdicts recomputed from them, the arms' labels and the paper's numbers
    as the JSON has them."""
    path = os.path.join(cfg['out_dir'], f'study_{name}.json')
    if not os.path.exists(path):
        fail(f"report_only: no {path} to rewrite study_{name}.md from (run the study first)")
    with open(path) as f:
        report = json.load(f)
    study = BUILD[name](cfg, tok)
    labels = {a['name']: a['label'] for a in report['arms']}
    study['arms'] = [{**a, 'label': labels[a['name']]} for a in study['arms'] if a['name'] in labels]
    study.update(paper=report['paper'], note=report['note'])
    rows = {a['name']: a['runs'] for a in report['arms']}
    text = markdown(name, study, rows, verdicts(study, rows))
    with open(os.path.join(cfg['out_dir'], f'study_{name}.md'), 'w') as f:
        f.write(text)
    print(f"wrote {os.path.join(cfg['out_dir'], f'study_{name}.md')} from {path}")


def main(argv):
    names = [a for a in argv if not a.startswith('-')]
    if '--help' in argv or '-h' in argv:
        names = []
    elif len(names) != 1 or names[0] not in (*STUDIES, 'all'):
        fail(f"name one study: {', '.join(STUDIES)} or all (python study.py encoders); --help for the knobs")
    own = knobs(globals())
    run = {**pipeline.run_knobs(), **knobs(vars(train))}
    cfg = configure({**run, **own}, [a for a in argv if a.startswith('-')], __doc__,
                    [('study (study.py)', list(own), __file__),
                     ('every arm (train.py; set per arm here: ' + ', '.join(PER_ARM) + ')',
                      [k for k in knobs(vars(train)) if k not in PER_ARM], train.__file__), *pipeline.help_sections()])
    for k in PER_ARM:
        if k != 'out_dir' and cfg[k] != run[k]:
            fail(f"study.py sets {k} for each arm (the preset's scale; seeds {SEEDS[0]} and {SEEDS[1]})")
    passthrough = {k: cfg[k] for k in run if k not in PER_ARM and cfg[k] != run[k]}
    if cfg['preset'] not in SCALE:
        fail(f"preset must be one of {', '.join(SCALE)}, got {cfg['preset']!r}")
    if cfg['nproc'] < 1:
        fail(f"nproc must be at least 1, got {cfg['nproc']}")
    tok = tokenizer.get_tokenizer(cfg['tokenizer'])
    for name in STUDIES if names[0] == 'all' else names:
        if cfg['report_only']:
            rewrite_report(name, cfg, tok)
        else:
            run_study(name, cfg, tok, passthrough)


if __name__ == '__main__':
    main(sys.argv[1:])
