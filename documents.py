"""
Documents of the embedded world: what one training document is (a text, a caption and its picture, questions
about a picture, a clip with or without actions), the picture pools they draw from, and the mixture of kinds.
data.py packs documents into batches.

A document is a list of segments: text (str) and visual blocks (Visual). What later tokens see of a noised
image (docs/design.md) — the policy of this repo:
    a visual block is either a TARGET (it is noised with its own t and carries the flow loss: the image of a
    caption->image document) or CONTEXT (it is fed clean, t = 1, and carries no flow loss: the image of an
    image->caption or question/answer document). So text that reads an image always reads it clean, and no
    token is ever trained on a noised picture it is supposed to describe.
"""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

import video
import world

QA_KIND_NAMES = {k.replace(' ', '_'): k for k in world.QUESTION_KINDS}   # qa_kinds' names: is_there, anything_at

# -----------------------------------------------------------------------------
# the picture pools

SPLITS = {'train': 0, 'val': 1, 'rae': 2}   # rae: the pictures the RAE's encoder and decoder train on
POOL_SEED = 0     # pools do not depend on the training seed, so every run shares one latent cache
N_VAL = 1024      # held-out pictures (or n_images, if fewer)


def _pool_rng(split, i):
    # picture i of a split has its own generator: any picture can be rebuilt alone, in any order
    return np.random.default_rng([POOL_SEED, SPLITS[split], i])


def world_scenes(split, n):
    return [world.sample_scene(_pool_rng(split, i)) for i in range(n)]


def picture(split, i, res=world.RES):
    """Picture i of a split: a still scene (that of world_scenes), except in the rae split, where one in
    four is a frame of a moving-object video or a view of a (training) navigation map, so that the RAE also
    encodes and decodes what video documents show."""
    rng = _pool_rng(split, i)
    if split == 'rae' and i % 8 == 6:
        ids = video.map_ids('train')
        x, y = rng.integers(0, video.MAP_SIZE - res + 1, 2)
        return video.view(video.make_map(ids[int(rng.integers(len(ids)))]), x, y, res)
    if split == 'rae' and i % 8 == 7:
        frames, _ = video.sample_video(rng, n_frames=int(rng.integers(1, 9)), res=res)
        return frames[-1]
    return world.render(world.sample_scene(rng), res, rng=rng)


def world_images(split, n, res=world.RES, start=0):
    """Pictures start..n-1 of a split: uint8 [n - start, res, res, 3]."""
    return np.stack([picture(split, i, res) for i in range(start, n)])


# -----------------------------------------------------------------------------
# documents


@dataclass
class Visual:
    image: object          # the raw picture (uint8 [H, W, 3]); encoded to latents when a batch is built
    target: bool           # True: noised + flow loss; False: clean context (see the policy above)
    latents: torch.Tensor = None  # [N, d], filled by the encoder


# Questions per qa document (multi-turn VQA). Only the answers depend on the picture, one or two tokens of
# each ~13-token line, so three questions share one picture's latent tokens (more per picture did not raise
# understanding: docs/results.md).
QA_PER_PICTURE = 3   # the qa_per_picture knob's default (data.KNOBS)


def qa_options(cfg):
    """The qa knobs of a config as (questions per picture, each kind's probability, balance), or None when they
    are the defaults (the documents drawn exactly as without the knobs); ValueError naming a bad value."""
    per, kinds = cfg.get('qa_per_picture', QA_PER_PICTURE), cfg.get('qa_kinds', '')
    balance = cfg.get('qa_balance', False)
    if (per, kinds, balance) == (QA_PER_PICTURE, '', False):
        return None
    weights = {k: 1.0 for k in world.QUESTION_KINDS}
    for part in filter(None, kinds.split(',')):
        name, _, w = part.partition('=')
        try:
            w = float(w)
        except ValueError:
            raise ValueError(f"qa_kinds entry {part!r} is not kind=weight") from None
        if name not in QA_KIND_NAMES or not w >= 0:
            raise ValueError(f"qa_kinds entry {part!r}: kinds are {', '.join(QA_KIND_NAMES)}, weights not negative")
        weights[QA_KIND_NAMES[name]] = w
    if per < 1 or sum(weights.values()) <= 0:
        raise ValueError(f"qa_per_picture must be at least 1 and some qa_kinds weight positive, got {per}, {kinds!r}")
    p = np.array([weights[k] for k in world.QUESTION_KINDS])
    return per, p / p.sum(), balance


def qa_lines(scene, rng, qa):
    """The question/answer pairs of one qa document. qa None: QA_PER_PICTURE uniform draws (the default).
    Else (per, kind probabilities, balance): `per` questions of kinds drawn by weight; with balance a yes/no
    kind comes as a pair about this picture, one answered yes and one no, in random order (when one question is
    left, a single one, yes or no at even odds)."""
    if qa is None:
        return [world.question_answer(scene, rng) for _ in range(QA_PER_PICTURE)]
    per, probs, balance = qa
    out = []
    while len(out) < per:
        kind = world.QUESTION_KINDS[rng.choice(len(probs), p=probs)]
        if balance and kind in ('is there', 'anything at'):
            answers = ['yes', 'no'][::1 if rng.random() < 0.5 else -1][:per - len(out)]
            out += [world.yes_no_question(scene, rng, kind, a) for a in answers]
        else:
            out.append(world.question_answer(scene, rng, kind))
    return out


def world_document(kind, rng, pool, p_uncond=0.0, qa=None):
    """One document of the embedded world. kind: text | caption2image | image2caption | qa.
    pool: (scenes, latents) of a split (WorldData.pool); the picture is one of its pictures, the text is
    drawn fresh, so one picture appears under many captions and questions. (An image_folder's pool holds
    captions instead of scenes: a picture keeps its own caption.) qa: qa_options' questions (None: default)."""
    if kind == 'text':
        return [world.text_document(rng)]
    scenes, latents = pool
    i = int(rng.integers(len(scenes)))
    scene, z = scenes[i], torch.from_numpy(np.array(latents[i]))   # float16, as batches carry it
    def caption():  # drawn only where used, so a qa document's random stream is its questions alone
        return scene if isinstance(scene, str) else world.caption(scene, rng)
    if kind == 'caption2image':
        # classifier-free guidance: 10% of generation documents lose their caption (docs/paper.md §4)
        text = '' if rng.random() < p_uncond else caption()
        return [text, Visual(None, True, z)] if text else [Visual(None, True, z)]
    if kind == 'image2caption':
        return [Visual(None, False, z), caption()]
    if kind == 'qa':  # several questions per picture, one per line (multi-turn VQA): see QA_PER_PICTURE
        lines = (f"q: {q} a: {a}" for q, a in qa_lines(scene, rng, qa))
        return [Visual(None, False, z), '\n'.join(lines)]
    raise ValueError(f"unknown document kind {kind!r}")


KINDS = ('text', 'caption2image', 'image2caption', 'qa', 'video', 'action')
# docs/paper.md §2.5: text 50%, image-text 22.5%, video 25%, action-conditioned video 2.5% (the paper's shares are
# of tokens; here they are of documents, and image-text is split evenly between the two directions)
PAPER_MIXTURE = 'text=0.5,caption2image=0.1125,image2caption=0.1125,video=0.25,action=0.025'


def at_res(frames, res):
    """uint8 [..., H, W, 3] pictures of the world (rendered at world.RES) resized to res x res (bilinear).
    Clips are rendered at the world's own 32 pixels and then resized, rather than rendered at res: an action's
    dx / dy, a mover's speed and the 96-pixel maps are in world pixels, so the same walk, the same action text
    and the same motion estimate hold at every image_size (a 224² model sees the 32² world, upscaled)."""
    frames = np.asarray(frames)
    if frames.shape[-3:-1] == (res, res):
        return frames
    flat = frames.reshape(-1, *frames.shape[-3:])
    out = np.stack([np.asarray(Image.fromarray(f).resize((res, res), Image.BILINEAR)) for f in flat])
    return out.reshape(*frames.shape[:-3], res, res, 3)


def video_document(kind, rng, split, n_frames, res=world.RES, action_drop=0.0):
    """A clip of n_frames pictures, each its own visual block, block-causal across frames. The last frame is
    always a TARGET; each earlier one is, with probability 1/2, a target too (noised with its own t) or else
    clean context. That is Diffusion Forcing with clean context mixed in: with t drawn per frame (shifted
    toward noise) a noised frame is almost never near-clean, yet a rollout conditions on clean frames.
    (Measured: all frames noised -> rollouts from clean context decode to patchy noise.)
    video: the motion in words, then the frames. action: an egocentric walk over a map (held-out maps in
    the val split), the action between two frames written as text, numeric or in words; with action_drop > 0
    each action is left out (the frames adjacent) with that probability: the unconditional branch of
    classifier-free guidance on actions (generate.rollout's action_cfg). Frames are res x res (at_res)."""
    if kind == 'video':
        frames, text = video.sample_video(rng, n_frames)
        say, steps = None, [None] * (n_frames - 1)
        doc = [text]
    elif kind == 'action':
        ids = video.map_ids('train' if split == 'train' else 'heldout')
        frames, steps, _ = video.sample_trajectory(rng, ids[int(rng.integers(len(ids)))], n_frames)
        say = video.format_words if rng.random() < 0.5 else video.format_action
        doc = []
    else:
        raise ValueError(f"unknown video document kind {kind!r}")
    target = list(rng.random(n_frames - 1) < 0.5) + [True]
    drop = rng.random(n_frames - 1) < action_drop if action_drop > 0 and say is not None else [False] * n_frames
    for i, frame in enumerate(at_res(frames, res)):
        if i and say is not None and not drop[i - 1]:
            doc.append(say(*steps[i - 1]))
        doc.append(Visual(frame, bool(target[i])))
    return doc


def parse_mixture(spec):
    """'text=0.3,caption2image=0.4,...' (or 'paper') -> (kinds, probabilities); a clear error on anything
    malformed."""
    spec = PAPER_MIXTURE if spec == 'paper' else spec
    kinds, weights = [], []
    for part in spec.split(','):
        name, _, w = part.partition('=')
        try:
            w = float(w)
        except ValueError:
            raise ValueError(f"mixture entry {part!r} is not name=weight") from None
        if name not in KINDS:
            raise ValueError(f"mixture entry {part!r} names no document kind (kinds: {', '.join(KINDS)})")
        if w < 0 or w != w:
            raise ValueError(f"mixture entry {part!r} has a negative weight")
        kinds.append(name)
        weights.append(w)
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"mixture {spec!r} has no positive weight")
    return kinds, [w / total for w in weights]


def document_lengths(kinds, tok, n_latent, video_frames, n=300, qa=None):
    """{kind: lengths in tokens of n documents of that kind drawn from a fixed seed}, without rendering or
    encoding a picture. (World documents come from a few templates, so n draws find the longest there is;
    clips, drawn n // 4 times, have a fixed layout.)"""
    rng = np.random.default_rng(0)
    scenes = world_scenes('train', 64)
    pool = scenes, np.zeros((len(scenes), n_latent, 1), np.float16)
    lengths = {}
    for kind in kinds:
        if kind in ('video', 'action'):
            docs = (video_document(kind, rng, 'train', video_frames) for _ in range(n // 4))
        else:
            docs = (world_document(kind, rng, pool, qa=qa) for _ in range(n))
        lengths[kind] = [doc_length(d, tok, n_latent) for d in docs]
    return lengths


def longest_documents(kinds, tok, n_latent, video_frames, qa=None):
    """{kind: the longest document of that kind in tokens}: what block_size must hold, checked before any
    long work."""
    return {k: max(v) for k, v in document_lengths(kinds, tok, n_latent, video_frames, qa=qa).items()}


def token_shares(mixture, tok, n_latent, video_frames):
    """{kind: its share of a mixture's tokens} (a mixture gives shares of documents; a text document is ~26
    tokens, a qa document ~58, a clip ~120): what 'equal tokens of one kind' between two mixtures needs."""
    kinds, probs = parse_mixture(mixture)
    lengths = document_lengths(kinds, tok, n_latent, video_frames)
    mass = {k: p * float(np.mean(lengths[k])) for k, p in zip(kinds, probs)}
    return {k: m / sum(mass.values()) for k, m in mass.items()}


def text_share(mixture, tok, n_latent, video_frames):
    """The share of a mixture's tokens that are text (everything but latent slots): what the LM head runs on."""
    kinds, probs = parse_mixture(mixture)
    lengths = document_lengths(kinds, tok, n_latent, video_frames)
    pictures = {'text': 0, 'caption2image': 1, 'image2caption': 1, 'qa': 1, 'video': video_frames,
                'action': video_frames}
    total = sum(p * float(np.mean(lengths[k])) for k, p in zip(kinds, probs))
    text = sum(p * (float(np.mean(lengths[k])) - pictures[k] * n_latent) for k, p in zip(kinds, probs))
    return text / total


def doc_length(doc, tok, n_latent):
    return 2 + sum(len(tok.encode(s)) if isinstance(s, str) else n_latent + 2 for s in doc)
