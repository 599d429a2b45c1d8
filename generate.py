"""
Generation from a model: text token by token, pictures by Euler steps with classifier-free guidance, both in
one document (the model itself opens a picture with <BOI>: docs/paper.md §3), and action-conditioned
rollouts of a world model. sample.py and eval.py call these; so can you.

    ids, images = generate(model, tok, segments)        # continue a document (text and/or pictures)
    z = text_to_image(model, tok, caption, B=8)         # latents [B, N, d]: encoder.decode(z) -> pixels
    z = rollout(model, tok, frames, actions)            # the next frames after context frames and actions

A KV cache keeps the prefix's keys and values, so each Euler step of a picture runs only its N latent slots;
use_cache=False recomputes the whole sequence every step (the reference the cache is tested against).
"""

import torch

import flow
from model import Inputs, KVCache


class Doc:
    """One document being generated for B samples at once: the per-token arrays that model.hidden reads,
    and how many of them the KV cache has already absorbed (`seen`)."""

    def __init__(self, tok, B, d_latent, device):
        self.tok = tok
        self.tokens = torch.zeros(B, 0, dtype=torch.long, device=device)
        self.modality = torch.zeros_like(self.tokens)
        self.block = torch.zeros_like(self.tokens)
        self.z = torch.zeros(B, 0, d_latent, device=device)
        self.t = torch.zeros(B, 0, device=device)
        self.n_blocks = 0
        self.seen = 0

    def __len__(self):
        return self.tokens.shape[1]

    def add_text(self, ids):
        """ids: a list (the same for every sample) or a (B, k) tensor."""
        B, d = self.z.shape[0], self.z.shape[2]
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.tokens.device)
        ids = ids.view(1, -1).expand(B, -1) if ids.dim() == 1 else ids
        k = ids.shape[1]
        self._add(ids, torch.zeros_like(ids), torch.full_like(ids, -1), self.z.new_zeros(B, k, d), self.t.new_ones(B, k))

    def add_latents(self, z, t=1.0):
        B, N, _ = z.shape
        slots = torch.full((B, N), self.tok.img, dtype=torch.long, device=z.device)
        self._add(slots, torch.ones_like(slots), torch.full_like(slots, self.n_blocks), z, self.t.new_full((B, N), t))
        self.n_blocks += 1

    def _add(self, tokens, modality, block, z, t):
        self.tokens = torch.cat([self.tokens, tokens], 1)
        self.modality = torch.cat([self.modality, modality], 1)
        self.block = torch.cat([self.block, block], 1)
        self.z = torch.cat([self.z, z], 1)
        self.t = torch.cat([self.t, t], 1)

    def inputs(self, start=0):
        """The model's Inputs for positions start.. of the document (one document: doc id 0 throughout)."""
        B, T = self.tokens.shape
        pos = torch.arange(start, T, device=self.tokens.device).expand(B, -1)
        doc = torch.zeros(B, T - start, dtype=torch.long, device=self.tokens.device)
        lat_idx = self.modality[:, start:].flatten().nonzero().squeeze(1)
        return Inputs(self.tokens[:, start:], self.modality[:, start:], self.block[:, start:], doc, pos, lat_idx,
                      self.z[:, start:].flatten(0, 1)[lat_idx], self.t[:, start:].flatten()[lat_idx])


def advance(model, doc, kv):
    """Hidden states of the positions the model has not seen yet; with a cache they are stored in it."""
    if kv is None:
        h = model.hidden(doc.inputs())[0]
        out = h[:, doc.seen:]
    else:
        out = model.hidden(doc.inputs(doc.seen), cache=kv)[0]
    doc.seen = len(doc)
    return out


def peek_block(model, doc, kv, z, t):
    """Hidden states of a tentative visual block (z at time t) after the document, leaving doc and cache as
    they were: one Euler step."""
    B, N, _ = z.shape
    saved = (doc.tokens, doc.modality, doc.block, doc.z, doc.t, doc.n_blocks)
    doc.add_latents(z, t)
    if kv is None:
        h = model.hidden(doc.inputs())[0][:, -N:]
    else:
        kv.store = False
        h = model.hidden(doc.inputs(doc.seen), cache=kv)[0]
        kv.store = True
    doc.tokens, doc.modality, doc.block, doc.z, doc.t, doc.n_blocks = saved
    return h


def next_token(model, h_last, temperature, top_k, generator):
    logits = model.lm_head(h_last).float()  # (B, vocab)
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def sample_image(model, tok, doc, kv, steps, cfg_scale, generator, uncond=None):
    """Append <BOI> to `doc` and generate that image's latents [B, N, d]. Classifier-free guidance runs
    against the unconditional document (default <BOS>, the caption dropped, as in training; a rollout's is its
    window without the last action), <BOI> appended, with a cache of its own when `doc` has one."""
    B = len(doc.tokens)
    cfg = model.cfg
    doc.add_text([tok.boi])
    advance(model, doc, kv)
    uncond = start_doc(model, tok, [], B) if uncond is None else uncond
    uncond.add_text([tok.boi])
    kvs = (kv, KVCache(cfg.n_layer) if kv is not None else None)
    advance(model, uncond, kvs[1])
    noise = torch.randn(B, cfg.n_latent, cfg.d_latent, generator=generator, device=doc.z.device)

    def velocity(z, t, cond):
        d, kv = (doc, kvs[0]) if cond else (uncond, kvs[1])
        h = peek_block(model, d, kv, z, t)
        t_tok = torch.full(z.shape[:2], t, device=z.device)
        return flow.to_velocity(model.lat_out(h).float(), z, t_tok, cfg.flow_target)

    return flow.euler_sample(velocity, noise, steps, cfg.alpha, cfg_scale)


def start_doc(model, tok, segments, B):
    """A document opened with <BOS> and the given segments (text, or Visual with latents) for B samples."""
    device = next(model.parameters()).device
    doc = Doc(tok, B, model.cfg.d_latent, device)
    doc.add_text([tok.bos])
    for s in segments:
        if isinstance(s, str):
            doc.add_text(tok.encode(s))
        else:
            doc.add_text([tok.boi])
            doc.add_latents(s.latents.to(device).expand(B, -1, -1))
            doc.add_text([tok.eoi])
    return doc


@torch.no_grad()
def text_to_image(model, tok, caption, B=1, steps=25, cfg_scale=3.0, seed=0, use_cache=True):
    """B images for one caption: <BOS> caption <BOI> then the Euler sampler. Returns latents [B, N, d]."""
    model.eval()
    doc = start_doc(model, tok, [caption], B)
    generator = torch.Generator(device=doc.z.device).manual_seed(seed)
    return sample_image(model, tok, doc, KVCache(model.cfg.n_layer) if use_cache else None, steps, cfg_scale,
                        generator)


@torch.no_grad()
def generate(model, tok, segments, B=1, max_new_tokens=100, steps=25, cfg_scale=3.0, temperature=0.0, top_k=0,
             seed=0, use_cache=True):
    """Continue a document for B samples. Text is decoded token by token until <EOS>. When every sample emits
    <BOI> at the same step (always so for B = 1) an image is generated with CFG, fed back clean, <EOI> is
    appended and text resumes; a <BOI> that not all samples emit ends that sample's text.
    Returns (new token ids [B, L] with -1 after the end, list of generated latents [B, N, d])."""
    model.eval()
    cfg = model.cfg
    doc = start_doc(model, tok, segments, B)
    kv = KVCache(cfg.n_layer) if use_cache else None
    generator = torch.Generator(device=doc.z.device).manual_seed(seed)
    images, out = [], []
    done = torch.zeros(B, dtype=torch.bool, device=doc.z.device)
    h = advance(model, doc, kv)
    for _ in range(max_new_tokens):
        ids = next_token(model, h[:, -1], temperature, top_k, generator)
        if (ids == tok.boi).all():
            z = sample_image(model, tok, doc, kv, steps, cfg_scale, generator)
            images.append(z)
            doc.add_latents(z)  # fed back clean (t = 1) as context for what follows
            advance(model, doc, kv)
            doc.add_text([tok.eoi])
            out += [ids, torch.full_like(ids, tok.eoi)]
            h = advance(model, doc, kv)
            continue
        ids = torch.where(done, -1, ids)
        out.append(ids)
        done |= (ids == tok.eos) | (ids == tok.boi)
        if done.all():
            break
        doc.add_text(ids.clamp(min=0)[:, None])
        h = advance(model, doc, kv)
    ids = torch.stack(out, 1) if out else torch.zeros(B, 0, dtype=torch.long)
    return ids, images


@torch.no_grad()
def rollout(model, tok, frames, actions, steps=25, seed=0, use_cache=True, renoise=None, action_cfg=None):
    """Action-conditioned prediction (docs/paper.md §7), for B walks at once. frames: latents of the F context
    frames [B, F, N, d]; actions: F - 1 + H action texts, each a list of B strings (or one string for all)
    whose token counts agree across B (numeric actions always do). Frame k + 1 follows action k. Each of the
    H new frames is predicted from the last F frames and the actions between them, the layout of a training
    clip of F + 1 frames (a sliding window, as NWM conditions on its last 4 frames): <BOS> f a f a ... f a,
    then Euler steps. Each generated frame is fed back noised to the level u = renoise (None: the model's
    rollout_noise; 0: clean), with that t, once, the same in every later window: trained with noised context
    (ctx_noise), the model reads past its own frames' errors (GameNGen). action_cfg (None: the model's knob)
    > 1 guides each frame on its action: classifier-free guidance against the same window without its last
    action (a model trained with action_drop > 0 has seen frames follow each other without one).
    Returns the clean predictions [B, H, N, d]."""
    model.eval()
    B, F = frames.shape[:2]
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = []
    for act in actions:
        texts = [act] * B if isinstance(act, str) else act
        enc = [tok.encode(a) for a in texts]
        if len({len(e) for e in enc}) != 1:
            raise ValueError(f"action texts {texts} tokenize to different lengths; batch equal-length ones")
        ids.append(torch.tensor(enc, device=device))
    renoise = model.cfg.rollout_noise if renoise is None else renoise
    action_cfg = model.cfg.action_cfg if action_cfg is None else action_cfg
    seq = list(frames.to(device).unbind(1))
    fed = [(z, 1.0) for z in seq]   # what the windows read: the true frames clean, generated ones re-noised
    for h in range(len(actions) - (F - 1)):
        first = len(seq) - F      # index of the window's first frame

        def window(last_action):
            doc = Doc(tok, B, model.cfg.d_latent, device)
            doc.add_text([tok.bos])
            for k in range(F):
                doc.add_text([tok.boi])
                doc.add_latents(*fed[first + k])
                doc.add_text([tok.eoi])
                if k < F - 1 or last_action:
                    doc.add_text(ids[first + k])
            return doc
        doc = window(True)
        if len(doc) + model.cfg.n_latent + 1 > model.cfg.block_size:
            raise ValueError(f"a rollout window of {F} frames and their actions takes {len(doc)} tokens, too many "
                             f"for this model's context of {model.cfg.block_size} (train with block_size=512)")
        kv = KVCache(model.cfg.n_layer) if use_cache else None
        uncond = window(False) if action_cfg != 1 else None
        seq.append(sample_image(model, tok, doc, kv, steps, action_cfg, generator, uncond))   # opens <BOI>
        if renoise > 0:
            noise = torch.randn(seq[-1].shape, generator=generator, device=device)
            fed.append((flow.add_noise(seq[-1], noise, torch.tensor(1 - renoise, device=device)), 1 - renoise))
        else:
            fed.append((seq[-1], 1.0))
    return torch.stack(seq[F:], 1)
