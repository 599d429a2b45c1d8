"""
Score a checkpoint on held-out world data, in the embedded-world form of the paper's metrics (docs/paper.md §8):

    text perplexity        on text-only documents and on captions (DCLM / Notes PPL analogue)
    diffusion loss         on caption->image documents, at a fixed grid of t (held-out CC12M loss analogue)
    generation accuracy    generate from held-out captions, decode, parse with the scene parser, score each
                           attribute, for seen and held-out colour x shape combinations (GenEval analogue)
    understanding accuracy answer questions about held-out images (VQA analogue)

    python eval.py                       # out/ckpt.pt -> a table, and out/eval.json
    python eval.py --ckpt=out-moe/ckpt.pt --n_prompts=100
    python eval.py --only=understanding  # the held-out losses and one part (generation, understanding, world)

Every score is printed beside its chance level.
"""

import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import data
import documents
import video
import world
from configurator import configure, fail, finite_or_null, knobs, resolve_device
from generate import generate, rollout, text_to_image
from moe import routing_stats
from pipeline import held_out_losses, load_checkpoint, make_dataset
from data import to_uint8

# -----------------------------------------------------------------------------
ckpt = 'out/ckpt.pt'      # the checkpoint to score
out = ''                  # '' = eval.json beside the checkpoint
n_batches = 8             # held-out batches per perplexity / diffusion number
t_grid = '0.1,0.3,0.5,0.7,0.9'  # the fixed t of the diffusion losses
n_prompts = 64            # generation prompts per (object count, seen / held-out combos)
steps = 25                # Euler steps per picture
cfg_scale = 3.0           # classifier-free guidance scale
n_per_cell = 100          # understanding: questions per (kind of question, object count): 7 x 3 cells
n_rollouts = 32           # held-out walks for the world-model error (checkpoints trained on action documents)
context = 4               # true frames before the rollout
horizon = 4               # predicted frames
n_plans = 16              # planning episodes
plan_steps = 10           # Euler steps per predicted frame while planning (CEM runs many rollouts)
seed = 0                  # the evaluation's seed (prompts, pictures, questions, walks)
rollout_noise = -1.0      # rollouts: the noise level generated frames are fed back at (-1: the checkpoint's)
action_cfg = -1.0         # rollouts and planning: guidance scale on the action (-1: the checkpoint's)
only = ''                 # '' = every part; else some of generation,understanding,world, or just losses
device = 'auto'           # auto | cpu | cuda | cuda:N
# -----------------------------------------------------------------------------


def check_knobs(cfg):
    for k in ('n_batches', 'n_prompts', 'steps', 'n_per_cell', 'n_rollouts', 'context', 'horizon', 'n_plans',
              'plan_steps'):
        if cfg[k] < 1:
            fail(f"{k} must be at least 1, got {cfg[k]}")
    if not (cfg['action_cfg'] == -1 or cfg['action_cfg'] >= 0):
        fail(f"action_cfg must be -1 (the checkpoint's) or not negative, got {cfg['action_cfg']}")
    if not (cfg['rollout_noise'] == -1 or 0 <= cfg['rollout_noise'] < 1):
        fail(f"rollout_noise must be -1 (the checkpoint's) or in [0, 1), got {cfg['rollout_noise']}")
    if cfg['cfg_scale'] < 0:
        fail(f"cfg_scale must not be negative, got {cfg['cfg_scale']}")
    try:
        ts = [float(t) for t in cfg['t_grid'].split(',')]
    except ValueError:
        fail(f"t_grid must be comma-separated numbers, got {cfg['t_grid']!r}")
    if not all(0 <= t < 1 for t in ts):
        fail(f"every t of t_grid must lie in [0, 1) (t = 1 is clean), got {cfg['t_grid']!r}")
    parts = set(cfg['only'].split(',')) if cfg['only'] else set(PARTS)
    if parts - {*PARTS, 'losses'}:
        fail(f"only takes some of {','.join(PARTS)}, or losses, got {cfg['only']!r}")
    return ts, parts - {'losses'}


PARTS = ('generation', 'understanding', 'world')  # what `only` selects; the held-out losses always run


def score_scene(pred, true):
    """GenEval-style checks of a parsed picture against the prompt's scene: for each prompted object, is
    there a picture object of its colour, of its shape, at its place, and one that is all three at once."""
    hits = {k: [] for k in ('color', 'shape', 'position', 'object')}
    for o in true:
        hits['color'].append(any(p.color == o.color for p in pred))
        hits['shape'].append(any(p.shape == o.shape for p in pred))
        hits['position'].append(any(p.place == o.place for p in pred))
        hits['object'].append(any((p.color, p.shape, p.place) == (o.color, o.shape, o.place) for p in pred))
    res = {k: float(np.mean(v)) for k, v in hits.items()}
    res['count'] = float(len(pred) == len(true))
    res['scene'] = float(tuple(pred) == tuple(true))
    return res


def generation_accuracy(model, tok, encoder, n, n_objects, heldout, steps, cfg_scale, seed):
    rng = np.random.default_rng([seed, 11, n_objects, int(heldout)])
    scores = []
    for i in tqdm(range(n), desc=f"generation ({n_objects} obj, {'held-out' if heldout else 'seen'} combos)",
                  leave=False):
        scene = world.sample_scene(rng, n_objects, heldout=heldout)
        z = text_to_image(model, tok, world.caption(scene, rng), B=1, steps=steps, cfg_scale=cfg_scale, seed=i)
        scores.append(score_scene(world.parse(to_uint8(encoder.decode(z))[0]), scene))
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def answer_chance(answer):
    """Chance of guessing the answer among the candidates of its kind."""
    for options in (world.COLORS, world.SHAPES, world.PLACES, world.SIZES, ('yes', 'no'), ('1', '2', '3')):
        if answer in options:
            return 1 / len(options)
    return 0.0


def answer_tokens(tok):
    """Enough new tokens for the longest answer of any kind, and the newline that ends it."""
    answers = [*world.COLORS, *world.SHAPES, *world.PLACES, *world.SIZES, 'yes', 'no', '1', '2', '3']
    return max(len(tok.encode(f' {a}\n')) for a in answers)


def understanding_accuracy(model, tok, encoder, n_per_cell, seed):
    """Greedy answers to questions about held-out pictures, n_per_cell of each kind of question
    (world.QUESTION_KINDS) on pictures of 1, 2 and 3 objects: the accuracy overall and per kind, and per
    (kind, object count) cell, each beside the chance of a uniform guess among its answers and the accuracy of
    the best constant answer on these very questions ('majority': 'yes' is right ~60% of the time, so a model
    that always says yes scores that without looking). The cells are the binding test: a model that answers
    about a random object of the picture (the question not bound to its object) scores about 1, 1/2, 1/3 on
    colour, shape and place questions with 1, 2, 3 objects."""
    rng = np.random.default_rng([seed, 13])
    device = next(model.parameters()).device
    max_new = answer_tokens(tok)
    rows = []
    cells = [(kind, n_obj) for kind in world.QUESTION_KINDS for n_obj in (1, 2, 3)]
    for kind, n_obj in tqdm([c for c in cells for _ in range(n_per_cell)], desc='understanding', leave=False):
        scene = world.sample_scene(rng, n_obj)
        z = encoder.encode(data.image_tensor([world.render(scene, encoder.res, rng=rng)]).to(device))[0]
        q, a = world.question_answer(scene, rng, kind)
        ids, _ = generate(model, tok, [documents.Visual(None, False, z), f"q: {q} a:"], max_new_tokens=max_new)
        # the answer is the rest of the line (training documents ask one question per line)
        said = tok.decode([i for i in ids[0].tolist() if 0 <= i < tok.pad]).split('\n')[0].strip()
        rows.append((kind, n_obj, said == a, answer_chance(a), a))

    def summary(sel):
        answers = [r[4] for r in sel]
        return {'accuracy': float(np.mean([r[2] for r in sel])), 'chance': float(np.mean([r[3] for r in sel])),
                'majority': max(map(answers.count, set(answers))) / len(answers), 'n': len(sel)}
    by_kind = {}
    for kind in world.QUESTION_KINDS:
        sel = [r for r in rows if r[0] == kind]
        by_kind[kind] = {**summary(sel), 'by_objects': {str(k): summary([r for r in sel if r[1] == k])
                                                        for k in (1, 2, 3)}}
    return {**summary(rows), 'majority': float(np.mean([k['majority'] for k in by_kind.values()])),
            'by_kind': by_kind}


def heldout_walks(n, n_frames, seed):
    """n walks over held-out maps: (map id, frames uint8 [F, H, W, 3], actions [(dx, dy)], positions)."""
    rng = np.random.default_rng([seed, 17])
    return [video.heldout_walk(rng, n_frames) for _ in range(n)]


def encode_frames(encoder, frames, device):
    """uint8 [B, F, H, W, 3] world frames (32²) -> latents [B, F, N, d] on device, resized to the encoder's
    picture size as training clips are (documents.at_res)."""
    B, F = frames.shape[:2]
    frames = documents.at_res(frames.reshape(B * F, *frames.shape[2:]), encoder.res)
    z = encoder.encode(data.image_tensor(frames).to(device))
    return z.view(B, F, *z.shape[1:])


@torch.no_grad()
def world_model_error(model, tok, encoder, n, context, horizon, steps, seed, batch=8):
    """Roll the model out for `horizon` frames after `context` true frames of held-out walks, with the true
    actions, and read the motion back from the pictures: the camera shift between consecutive decoded frames
    (phase correlation, video.estimate_shift) against the action taken. RPE: per-step error of the shift;
    ATE: error of the accumulated position, averaged over the rollout (docs/paper.md §7's NWM metrics, in pixels).
    The no-motion baseline predicts the last frame again: its shifts are 0. The RAE ceiling (rpe_rae,
    ate_rae) scores the true frames after a round trip through the encoder and decoder: no model can do better
    through this decoder. latent_error (latent_error_terms) splits the rollout's error by predicted frame into
    exposure bias (right from true frames, wrong from its own) and an ignored action (a copy of its input):
    each frame is also predicted teacher-forced, from the true frames before it (rpe_teacher_forced: its
    one-step motion error in pixels)."""
    walks = heldout_walks(n, context + horizon, seed)
    device = next(model.parameters()).device
    err = {'rpe': [], 'ate': [], 'rpe_still': [], 'ate_still': [], 'rpe_rae': [], 'ate_rae': [],
           'rpe_teacher_forced': []}
    lat = {k: [] for k in ('ar_vs_true', 'ar_vs_input', 'tf_vs_true', 'tf_vs_input', 'still', 'step')}
    for i in tqdm(range(0, n, batch), desc='world model rollouts', leave=False):
        chunk = walks[i:i + batch]
        frames = encode_frames(encoder, np.stack([w[1] for w in chunk]), device)
        acts = [[video.format_action(*w[2][k]) for w in chunk] for k in range(context + horizon - 1)]
        pred = rollout(model, tok, frames[:, :context], acts, steps, seed)
        true = [np.array(w[2][context - 1:], dtype=float) for w in chunk]
        for tag, future in (('', pred), ('_rae', frames[:, context:])):
            for key, e in motion_errors(encoder, frames[:, context - 1:context], future, true).items():
                err[key + tag] += e
        for t in true:
            err['rpe_still'] += list(np.linalg.norm(t, axis=1))
            err['ate_still'] += list(np.linalg.norm(np.cumsum(t, 0), axis=1))
        forced = teacher_forced(model, tok, frames, acts, context, horizon, steps, seed)
        for key, e in latent_error_terms(frames, pred, forced, context).items():
            lat[key].append(e)
        # one step from true frames: the shift between true frame k - 1 and the frame predicted after it
        err['rpe_teacher_forced'] += motion_errors(encoder, frames[:, context - 1:-1].flatten(0, 1)[:, None],
                                                   forced.flatten(0, 1)[:, None],
                                                   [t[k:k + 1] for t in true for k in range(horizon)])['rpe']
    res = {k: float(np.mean(v)) for k, v in err.items()}
    res['ate_ratio'] = res['ate'] / res['ate_still']
    res['latent_error'] = {k: torch.cat(v).mean(0).tolist() for k, v in lat.items()}
    res['rollout_noise'] = model.cfg.rollout_noise
    res['action_cfg'] = model.cfg.action_cfg
    return res


@torch.no_grad()
def teacher_forced(model, tok, frames, acts, context, horizon, steps, seed):
    """Frame context + k predicted from the `context` TRUE frames before it (k = 0 .. horizon - 1) and the
    true actions: what the rollout would give at step k if every frame it had fed back were right.
    frames [B, context + horizon, N, d] -> [B, horizon, N, d]."""
    return torch.stack([rollout(model, tok, frames[:, k:k + context], acts[k:k + context], steps, seed)[:, 0]
                        for k in range(horizon)], 1)


def latent_error_terms(frames, pred, forced, context):
    """Where a rollout's error comes from, in latent space (mean squared error per latent value), per walk and
    predicted frame k = 1 .. H ([B, H] tensors): frames [B, context + H, N, d] true latents; pred the
    autoregressive rollout's frames and forced the teacher-forced ones ([B, H, N, d]).
        ar_vs_true / tf_vs_true     the predicted frame against the true frame k
        ar_vs_input / tf_vs_input   the predicted frame against the last frame it was conditioned on (the
                                    model's own previous frame in the rollout, the true one when forced):
                                    near 0 means the model copies its input and ignores the action
        still                       the last true context frame against the true frame k (standing still)
        step                        true frame k - 1 against true frame k (copying the input, teacher-forced)
    A tf_vs_true well below step with an ar_vs_true that grows past still is exposure bias (right from true
    frames, lost from its own); a tf_vs_true near step with tf_vs_input near 0 is an ignored action."""
    mse = lambda a, b: (a.float() - b.float()).square().mean((-2, -1)).cpu()
    true, last = frames[:, context:], frames[:, context - 1:-1]
    ar_inputs = torch.cat([frames[:, context - 1:context], pred[:, :-1]], 1)
    return {'ar_vs_true': mse(pred, true), 'ar_vs_input': mse(pred, ar_inputs),
            'tf_vs_true': mse(forced, true), 'tf_vs_input': mse(forced, last),
            'still': mse(frames[:, context - 1:context], true), 'step': mse(last, true)}


def motion_errors(encoder, last, future, true):
    """Decode the last true frame and the H frames after it ([B, 1 + H] latents), read the camera shift
    between consecutive pictures and compare with the true shifts (B arrays [H, 2]): per-step (RPE) and
    accumulated (ATE) errors in pixels, as lists over B x H."""
    seq = torch.cat([last, future], 1)
    pics = documents.at_res(to_uint8(encoder.decode(seq.flatten(0, 1))), world.RES)   # shifts are in world pixels
    pics = pics.reshape(*seq.shape[:2], world.RES, world.RES, 3)
    err = {'rpe': [], 'ate': []}
    for p, t in zip(pics, true):
        est = np.array([video.estimate_shift(p[k], p[k + 1]) for k in range(len(t))])
        err['rpe'] += list(np.linalg.norm(est - t, axis=1))
        err['ate'] += list(np.linalg.norm(np.cumsum(est, 0) - np.cumsum(t, 0), axis=1))
    return err


@torch.no_grad()
def planning(model, tok, encoder, n, context, steps, seed, population=32, iters=3, n_elite=6):
    """Goal-reaching with the model as simulator (NWM-style, docs/paper.md §7): after `context` frames of a
    held-out walk, a goal view one action away is given; the cross-entropy method searches actions (dx, dy),
    scoring each by the latent distance between the frame the model predicts for it and the goal's latents.
    Returns the final position error (pixels) of the best plan, executed in the true world, and of a random
    action."""
    rng = np.random.default_rng([seed, 23])
    device = next(model.parameters()).device
    lim = video.MAP_SIZE - world.RES
    plan_err, random_err = [], []
    for map_id, frames, actions, positions in tqdm(heldout_walks(n, context, seed + 1), desc='planning',
                                                   leave=False):
        x, y = positions[-1]
        goal = np.clip(np.array([x, y]) + rng.integers(-video.MAX_STEP, video.MAX_STEP + 1, 2), 0, lim)
        z_goal = encode_frames(encoder, video.view(video.make_map(map_id), *goal)[None, None], device)[0]
        z_ctx = encode_frames(encoder, frames[None], device).expand(population, -1, -1, -1)
        acts = [video.format_action(*a) for a in actions]
        mu, sd = np.zeros(2), np.full(2, video.MAX_STEP / 2)
        for _ in range(iters):
            cand = np.clip(np.round(mu + sd * rng.standard_normal((population, 2))), -video.MAX_STEP, video.MAX_STEP)
            cand = np.clip(cand + [x, y], 0, lim) - [x, y]            # moves that keep the view on the map
            pred = rollout(model, tok, z_ctx, acts + [[video.format_action(*c) for c in cand.astype(int)]],
                           steps, seed)[:, 0]
            cost = (pred - z_goal).square().mean((1, 2)).cpu().numpy()
            elite = cand[np.argsort(cost)[:n_elite]]
            mu, sd = elite.mean(0), elite.std(0) + 0.5
        best = cand[np.argmin(cost)]
        plan_err.append(np.linalg.norm(np.array([x, y]) + best - goal))
        rand = np.clip(np.array([x, y]) + rng.integers(-video.MAX_STEP, video.MAX_STEP + 1, 2), 0, lim)
        random_err.append(np.linalg.norm(rand - goal))
    return {'cem_position_error': float(np.mean(plan_err)), 'random_position_error': float(np.mean(random_err))}


@torch.no_grad()
def expert_specialisation(model, dataset, n_batches):
    """Routing counts per layer on held-out batches of every kind -> the specialisation table (docs/paper.md §6)."""
    counts = 0
    device = next(model.parameters()).device
    for i in range(n_batches):
        for kind in ('text=1', 'caption2image=1', 'image2caption=1'):
            batch = data.encode_pending(dataset.get('val', i, mixture=kind).to(device), dataset.encoder)
            counts = counts + model(batch)[1]['counts']
    table = []
    for layer, c in enumerate(counts):
        s = routing_stats(c, model.blocks[layer].ffn.k)
        table.append({k: s[k] for k in ('n_text', 'n_vision', 'n_multimodal', 'n_dead')})
    return table


def text_bytes_per_token(dataset, tok, n_batches):
    """Bytes of text per LM target on the held-out text documents (the special tokens count as none): turns
    the per-token text loss into nats per byte, comparable across tokenizers."""
    n_targets = n_bytes = 0
    for i in range(n_batches):
        b = dataset.get('val', i, mixture='text=1')
        ids = b.targets[b.targets >= 0]
        n_targets += len(ids)
        n_bytes += len(tok.decode(ids.tolist()).encode('utf-8'))
    return n_bytes / n_targets


def scores(cfg, model, tok, encoder, tcfg, ts, parts=PARTS):
    """Every number of the report, as one dict: the held-out losses, and each part of `parts` (the world
    model only for a checkpoint that trained on action clips, unless it is asked for by name)."""
    dataset = make_dataset(tcfg, tok, encoder, None, tcfg['seed'])
    losses = held_out_losses(model, dataset, cfg['n_batches'], t_grid=ts)
    # a model that never read a text document has no text perplexity worth a number (null, not a huge one)
    saw_text = 'text' in documents.parse_mixture(tcfg['mixture'])[0]
    res = {'checkpoint': cfg['ckpt'], 'text_ppl': losses['val_text_ppl'] if saw_text else None,
           'caption_ppl': float(np.exp(losses['val_caption_loss'])),
           'text_loss_per_byte': losses['val_text_loss'] / text_bytes_per_token(dataset, tok, cfg['n_batches'])
           if saw_text else None,
           **{f'diffusion_loss_t{t:g}': losses[f'val_flow_t{t:g}_loss'] for t in ts}}
    res['diffusion_loss_mean'] = float(np.mean([res[f'diffusion_loss_t{t:g}'] for t in ts]))
    for n_obj in (1, 2) if 'generation' in parts else ():
        for heldout in (False, True):
            key = f"gen_{n_obj}obj_{'heldout' if heldout else 'seen'}"
            res[key] = generation_accuracy(model, tok, encoder, cfg['n_prompts'], n_obj, heldout,
                                           cfg['steps'], cfg['cfg_scale'], cfg['seed'])
    if model.cfg.ffn == 'moe':
        res['experts'] = expert_specialisation(model, dataset, cfg['n_batches'])
    res['chance'] = {'color': 1 / len(world.COLORS), 'shape': 1 / len(world.SHAPES),
                     'position': 1 / len(world.PLACES)}
    if 'understanding' in parts:
        res['understanding'] = understanding_accuracy(model, tok, encoder, cfg['n_per_cell'], cfg['seed'])
        res['chance']['understanding'] = res['understanding']['chance']
    if 'world' in parts and ('action' in documents.parse_mixture(tcfg['mixture'])[0] or cfg['only']):
        res['world_model'] = world_model_error(model, tok, encoder, cfg['n_rollouts'], cfg['context'],
                                               cfg['horizon'], cfg['steps'], cfg['seed'])
        res['planning'] = planning(model, tok, encoder, cfg['n_plans'], cfg['context'], cfg['plan_steps'],
                                   cfg['seed'])
    return res


def print_report(res, model, tok, ts, cfg):
    print(f"\n{'metric':34s} {'value':>8s}   chance")
    if res['text_ppl'] is None:
        print(f"{'text ppl (text documents)':34s} {'-':>8s}   (no text documents in the training mixture)")
    else:
        print(f"{'text ppl (text documents)':34s} {res['text_ppl']:8.3f}   {tok.vocab_size} (uniform)")
        print(f"{'text loss per byte (nats)':34s} {res['text_loss_per_byte']:8.4f}")
    print(f"{'text ppl (captions)':34s} {res['caption_ppl']:8.3f}   {tok.vocab_size} (uniform)")
    for t in ts:
        print(f"{f'diffusion loss at t={t:g}':34s} {res[f'diffusion_loss_t{t:g}']:8.4f}")
    for key in [k for k in res if k.startswith('gen_')]:
        for attr in ('color', 'shape', 'position', 'object', 'count', 'scene'):
            c = res['chance'].get(attr)
            print(f"{f'{key} {attr}':34s} {res[key][attr]:8.3f}   {'' if c is None else f'{c:.3f}'}")
    u = res.get('understanding', {'by_kind': {}})
    if 'accuracy' in u:
        print(f"{'understanding (QA) accuracy':34s} {u['accuracy']:8.3f}   {u['chance']:.3f}   "
              f"{u['majority']:.3f} (best constant answer per kind)")
    for name, r in u['by_kind'].items():
        cells = ' / '.join(f"{c['accuracy']:.2f}" for c in r['by_objects'].values())
        label = f"  {name} ({r['n']} questions)"
        print(f"{label:34s} {r['accuracy']:8.3f}   {r['chance']:.3f}   {r['majority']:.3f}   "
              f"by 1/2/3 objects: {cells}")
    if 'world_model' in res:
        w, p = res['world_model'], res['planning']
        label = f"world model ATE, {cfg['horizon']}-step rollout (px)"
        print(f"{label:34s} {w['ate']:8.3f}   {w['ate_still']:.3f} (no motion)   {w['ate_rae']:.3f} (true frames "
              f"through the RAE)")
        print(f"{'world model RPE (px)':34s} {w['rpe']:8.3f}   {w['rpe_still']:.3f} (no motion)   "
              f"{w['rpe_rae']:.3f} (true frames through the RAE)")
        print(f"{'world model RPE, one step from true':34s} {w['rpe_teacher_forced']:8.3f}   (teacher-forced)")
        print("latent MSE of predicted frame k = 1..H: against the truth / against the frame it was fed last")
        lat = w['latent_error']
        for name, a, b in (('rollout (own frames)', 'ar_vs_true', 'ar_vs_input'),
                           ('teacher-forced (true frames)', 'tf_vs_true', 'tf_vs_input'),
                           ('standing still / copying', 'still', 'step')):
            print(f"  {name:32s} " + '  '.join(f"{x:.3f}/{y:.3f}" for x, y in zip(lat[a], lat[b])))
        print(f"{'planning: final position error (px)':34s} {p['cem_position_error']:8.3f}   "
              f"{p['random_position_error']:.3f} (random action)")
    if 'experts' in res:
        shared = {'none': 0, 'global': 1, 'modality': 2}[model.cfg.moe_shared]
        print(f"\nexperts per layer ({model.cfg.moe_experts} routed + {shared} shared; text: S >= 0.5, "
              f"vision: S <= -0.5)\nlayer  text  vision  multimodal  dead")
        for i, row in enumerate(res['experts']):
            print(f"{i:5d} {row['n_text']:5d} {row['n_vision']:7d} {row['n_multimodal']:11d} {row['n_dead']:5d}")


def main(argv):
    cfg = configure(knobs(globals()), argv, __doc__)
    ts, parts = check_knobs(cfg)
    model, tok, encoder, tcfg = load_checkpoint(cfg['ckpt'], resolve_device(cfg['device']))
    if cfg['rollout_noise'] >= 0:
        model.cfg.rollout_noise = cfg['rollout_noise']
    if cfg['action_cfg'] >= 0:
        model.cfg.action_cfg = cfg['action_cfg']
    # the scene parser, the questions and the maps are the world's: a model of your pictures or videos gets
    # the held-out losses on them (and the world parts its other data allow)
    own_pictures = tcfg['image_folder'] or tcfg['image_shards']
    own_clips = tcfg['video_folder'] or tcfg['video_shards']
    world_only = {'generation', 'understanding'} if own_pictures else set()
    world_only |= {'world'} if own_clips else set()
    if parts & world_only:   # shards: the held-out losses read the held-out split of the shards (the key hash)
        print(f"{own_pictures or own_clips}: scoring held-out losses on it; "
              f"{', '.join(sorted(parts & world_only))} are scored on the embedded world only: skipped")
        parts -= world_only
    res = scores(cfg, model, tok, encoder, tcfg, ts, parts)
    print_report(res, model, tok, ts, cfg)
    path = cfg['out'] or os.path.join(os.path.dirname(cfg['ckpt']) or '.', 'eval.json')
    with open(path, 'w') as f:
        json.dump(finite_or_null(res), f, indent=1)
    print(f"wrote {path}")


if __name__ == '__main__':
    main(sys.argv[1:])
