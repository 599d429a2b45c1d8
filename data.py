"""
Data: batches of documents (documents.py: the embedded world's, or real text, or a folder's or shards'
pictures and clips), packed into fixed-length interleaved rows, and the latent cache of the picture pools.

In the token stream a visual block is `<BOI>` + N latent slots + `<EOI>`; every document is
`<BOS> ... <EOS>`. Several documents are packed into one row of length T; what is left at the end of a row is
padding. A TARGET block is noised and carries the flow loss, a CONTEXT block is fed clean (documents.py).

Every batch is a pure function of (seed, split, step, index): resuming a run needs only the step, and DDP
ranks read disjoint streams by asking for different indices (train.py: index = micro * world + rank).
"""

import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import torch
from tqdm import tqdm

from configurator import remove_orphans
from documents import (N_VAL, POOL_SEED, QA_PER_PICTURE, SPLITS, Visual, doc_length, parse_mixture,
                       video_document, world_document, world_images, world_scenes)

# -----------------------------------------------------------------------------
# knobs: what the batches are made of (train.py and bench.py read them; `python train.py --help` lists them)
KNOBS = dict(
    tokenizer='world',       # world (a BPE learnt from the world's text) | byte | a tiktoken encoding (gpt2)
    vocab_size=0,            # 0 = the tokenizer's; larger pads the embedding (the paper's LLaMA-3 size: 128256)
    text_source='',          # '' = the world's text documents; else a .txt path or http(s) URL of real text
    mixture='text=0.1,caption2image=0.35,image2caption=0.1,qa=0.25,action=0.2',  # document shares (+ video; 'paper')
    video_frames=5,          # frames per video / action clip (each n_latent + 2 tokens): must fit in block_size
    p_uncond=0.1,            # caption dropout for classifier-free guidance (docs/paper.md §4)
    n_images=16384,          # training pictures in the pool, encoded once into the latent cache
    image_folder='',         # your pictures (+ captions.jsonl or .txt files) for caption<->image documents (folders.py)
    video_folder='',         # your GIFs / MP4s (+ .txt captions, .actions lines) for video and action documents
    video_fps=0.0,           # video_folder: frames sampled per second of video (0 = every frame)
    block_size=256,          # tokens per packed row (a 5-frame clip of 16-latent frames is ~110; 64-latent: 512)
    batch_size=8,            # rows per micro-batch, per process
    image_shards='',         # image-text tars ({key}.jpg|png|webp + .txt or .json caption, img2dataset's): a glob, {0..9} range, comma list, folder or URLs
    video_shards='',         # video tars ({key}.mp4|gif + .txt caption or .actions lines) for video and action documents
    text_shards='',          # text: JSON lines with a text field (.jsonl, .jsonl.gz, .jsonl.zst with zstandard) or parquet (with pyarrow)
    val_shards='',           # held-out shards among the lists above ('' = samples held out by a hash of their key)
    shard_val_share=0.01,    # shards: the share of samples held out, by key hash (when val_shards is '')
    shard_buffer=512,        # shards: the shuffle buffer of each reader, in samples
    shard_max_bad=0.2,       # shards: more than this share of a reader's samples unusable stops the run
    qa_per_picture=QA_PER_PICTURE,  # questions per qa document (one picture, one question a line)
    qa_kinds='',             # question kinds' weights, e.g. 'shape=2,is_there=2' (others 1); '' = uniform
    qa_balance=False,        # yes/no questions in pairs on one picture, one answered yes and one no
    action_drop=0.0,         # the world's action clips in training: each action text left out with this chance
)
TEXT_MAX_BYTES = 256 << 20   # a text_source larger than this is refused (it is read whole)
TEXT_TIMEOUT_S = 120         # a text_source URL must arrive within this many seconds

# -----------------------------------------------------------------------------
# packing


@dataclass
class Batch:
    """Packed rows. Per position, (B, T): the token layout. Per latent slot (the L positions with modality 1,
    row-major, n_latent per visual block): where it is, whether it is a target or a clip's context frame, its
    clean latent (float16: the latents travel only where they are). Pictures still to encode (clip frames are
    rendered fresh): their uint8 pixels and which visual block each fills; encode_pending() runs the encoder on
    the training device. Every index is computed here, on the host, so the step on the device never waits to
    learn a shape."""
    tokens: torch.Tensor      # (B, T) long: text ids; <IMG> at latent slots
    targets: torch.Tensor     # (B, T) long: next text token, -1 where there is no LM loss
    modality: torch.Tensor    # (B, T) long: 0 text, 1 latent
    block: torch.Tensor       # (B, T) long: visual block id within the row, -1 for text
    doc: torch.Tensor         # (B, T) long: document id within the row, -1 for padding
    pos: torch.Tensor         # (B, T) long: position within the document (RoPE)
    text_idx: torch.Tensor    # (n,) long: positions with an LM target, as flat indices b * T + j
    lat_idx: torch.Tensor     # (L,) long: latent slots, as flat indices b * T + j
    lat_target: torch.Tensor  # (L,) bool: slot of a TARGET block (noised, flow loss)
    lat_clip: torch.Tensor    # (L,) bool: slot of a CONTEXT frame of a clip (a document of several visual blocks)
    latents: torch.Tensor     # (L, d) float16: clean latents (zeros where pending)
    pixels: torch.Tensor      # (P, H, W, 3) uint8: pictures whose latents are still to be computed
    pending: torch.Tensor     # (P,) long: the visual block (counted row-major over the batch) each one fills
    streams = None            # not a field: {reader: state} of the shard readers this batch advanced (shard_data.py)

    def to(self, device):
        return self.keep_streams(Batch(*(getattr(self, f).to(device, non_blocking=True)
                                         for f in self.__dataclass_fields__)))

    def pin_memory(self):  # DataLoader(pin_memory=True) calls this on custom types: page-locked, for async copies
        return self.keep_streams(Batch(*(getattr(self, f).pin_memory() for f in self.__dataclass_fields__)))

    def keep_streams(self, other):
        other.streams = self.streams
        return other


@torch.no_grad()
def encode_pending(batch, encoder):
    """Fill the latents of the batch's pending pictures with the frozen encoder, on the batch's device, in the
    caller's precision (train.py runs it in the step's autocast), and drop the pixels. Returns the batch."""
    if len(batch.pending):
        z = encoder.encode(batch.pixels.permute(0, 3, 1, 2).float().div(255))   # [P, N, d]
        batch.latents.view(-1, *z.shape[1:])[batch.pending] = z.to(batch.latents.dtype)
        batch.pixels, batch.pending = batch.pixels[:0], batch.pending[:0]
    return batch


def pack(rows, tok, T, n_latent, d_latent):
    """rows: list of lists of documents -> Batch. Each row must fit in T. A Visual brings its latents
    [n_latent, d], or its picture (uint8 [H, W, 3]) to be encoded later (encode_pending)."""
    B = len(rows)
    tokens = torch.full((B, T), tok.pad, dtype=torch.long)
    modality = torch.zeros(B, T, dtype=torch.long)
    block = torch.full((B, T), -1, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    visuals = []  # every visual block in row-major order: the order of the latent slots
    clip = []     # whether each is a context frame of a clip (model.py's ctx_noise may noise those)
    for b, docs in enumerate(rows):
        i, n_blocks = 0, 0
        for d, segments in enumerate(docs):
            start = i
            ids = [tok.bos]
            several = sum(isinstance(s, Visual) for s in segments) > 1
            for s in segments:
                if isinstance(s, str):
                    ids += tok.encode(s)
                    continue
                ids.append(tok.boi)
                j = i + len(ids)
                tokens[b, i:j] = torch.tensor(ids)
                tokens[b, j:j + n_latent] = tok.img
                modality[b, j:j + n_latent] = 1
                block[b, j:j + n_latent] = n_blocks
                visuals.append(s)
                clip.append(several and not s.target)
                n_blocks += 1
                i, ids = j + n_latent, [tok.eoi]
            ids.append(tok.eos)
            if i + len(ids) > T:
                raise ValueError(f"a document of {i + len(ids) - start} tokens does not fit in block_size {T}")
            tokens[b, i:i + len(ids)] = torch.tensor(ids)
            i += len(ids)
            doc[b, start:i] = d
            pos[b, start:i] = torch.arange(i - start)
    # next-token targets: only text -> text within one document (no loss into or out of latent slots;
    # <EOI> is appended by the sampler, so predicting it is not trained either)
    targets = torch.full((B, T), -1, dtype=torch.long)
    same = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0) & (modality[:, 1:] == 0) & (modality[:, :-1] == 0)
    targets[:, :-1] = torch.where(same, tokens[:, 1:], -1)
    empty = torch.zeros(n_latent, d_latent, dtype=torch.float16)
    latents = torch.stack([empty if v.latents is None else v.latents.to(torch.float16) for v in visuals]) \
        if visuals else empty[:0]
    pending = [k for k, v in enumerate(visuals) if v.latents is None]
    pixels = (torch.from_numpy(np.stack([visuals[k].image for k in pending])) if pending
              else torch.zeros(0, 1, 1, 3, dtype=torch.uint8))
    per_slot = lambda flags: torch.tensor(flags, dtype=torch.bool).repeat_interleave(n_latent)
    return Batch(tokens, targets, modality, block, doc, pos, targets.flatten().ge(0).nonzero().squeeze(1),
                 modality.flatten().nonzero().squeeze(1), per_slot([v.target for v in visuals]), per_slot(clip),
                 latents.view(-1, d_latent), pixels, torch.tensor(pending, dtype=torch.long))


def unpack(batch, tok, row):
    """The documents of one row, as packed: the inverse of pack (text decoded, latents sliced; the batch's
    pending pictures must be encoded first)."""
    docs = []
    toks, docid = batch.tokens[row], batch.doc[row]
    T = batch.tokens.shape[1]
    slot_of = {int(p): k for k, p in enumerate(batch.lat_idx)}   # flat position -> index in the latents
    for d in range(int(docid.max()) + 1):
        idx = (docid == d).nonzero().squeeze(1)
        segments, text = [], []
        k = int(idx[0]) + 1  # skip <BOS>
        end = int(idx[-1])   # <EOS>
        while k < end:
            if toks[k] == tok.boi:
                if text:
                    segments.append(tok.decode(text))
                    text = []
                first = slot_of[row * T + k + 1]
                n = int((batch.block[row] == batch.block[row, k + 1]).sum())
                segments.append(Visual(None, bool(batch.lat_target[first]), batch.latents[first:first + n].float()))
                k += n + 2  # the slots and <EOI>
                continue
            text.append(int(toks[k]))
            k += 1
        if text:
            segments.append(tok.decode(text))
        docs.append(segments)
    return docs


def load_text(source):
    """Real text from a local file or an http(s) URL, as one string; ValueError naming the source when it
    cannot be read, is not UTF-8, is empty, is larger than TEXT_MAX_BYTES or (a URL) takes longer than
    TEXT_TIMEOUT_S to arrive."""
    if source.startswith(('http://', 'https://')):
        raw, deadline = bytearray(), time.monotonic() + TEXT_TIMEOUT_S
        try:
            with requests.get(source, stream=True, timeout=30) as r:
                r.raise_for_status()
                for chunk in r.iter_content(chunk_size=1 << 16):
                    raw += chunk
                    if len(raw) > TEXT_MAX_BYTES:
                        raise ValueError(f"text source {source} is larger than {TEXT_MAX_BYTES >> 20} MB")
                    if time.monotonic() > deadline:
                        raise ValueError(f"text source {source} took longer than {TEXT_TIMEOUT_S} s to download")
        except requests.RequestException as e:
            raise ValueError(f"could not fetch text from {source}: {e}") from None
    else:
        try:
            if os.path.getsize(source) > TEXT_MAX_BYTES:
                raise ValueError(f"text source {source} is larger than {TEXT_MAX_BYTES >> 20} MB")
            with open(source, 'rb') as f:
                raw = f.read()
        except OSError as e:
            raise ValueError(f"cannot read text source {source}: {e.strerror}") from None
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as e:
        raise ValueError(f"text source {source} is not UTF-8 text (byte {e.start} is {raw[e.start]:#04x})") from None
    if '\x00' in text:
        raise ValueError(f"text source {source} holds NUL bytes: a binary file, not text")
    if not text.strip():
        raise ValueError(f"text source {source} is empty")
    return text


def text_chunk(text, rng, tok, T):
    """A random window of the text that fits in one row with its <BOS> and <EOS>."""
    n = min(len(text), T - 2)
    start = int(rng.integers(0, len(text) - n + 1))
    chunk = text[start:start + n]
    while len(tok.encode(chunk)) > T - 2:  # multi-byte characters take more than one token
        chunk = chunk[:len(chunk) * 3 // 4]
    return chunk


def image_tensor(images):
    """uint8 [B, H, W, 3] (numpy) -> float [B, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)


def to_uint8(images):
    """float [B, 3, H, W] in ~[0, 1] (a decoder's output) -> uint8 [B, H, W, 3]: the inverse of image_tensor."""
    return (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def to_rgb8(img):
    """Any picture array imageio returns -> uint8 [H, W, 3]: 8- or 16-bit (or bool, or float in [0, 1]),
    grayscale [H, W] or [H, W, 1], grayscale + alpha [H, W, 2], RGB, RGBA; alpha is composited over black;
    an animation keeps its first frame. (imageio already expands palette pictures to RGB or RGBA.)"""
    img = np.asarray(img)
    if img.ndim == 4:
        img = img[0]
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"an array of shape {img.shape} is not a picture")
    if img.dtype == np.bool_:
        x = img.astype(np.float64)
    elif np.issubdtype(img.dtype, np.integer):  # 16-bit (uint16, or Pillow's int32 'I' mode): 65535 is white
        x = img.astype(np.float64) / (255 if img.dtype == np.uint8 or img.max() <= 255 and img.dtype != np.uint16
                                      else 65535)
    else:
        x = np.clip(img.astype(np.float64), 0, 1)
    if x.shape[-1] in (2, 4):  # alpha
        x = x[..., :-1] * x[..., -1:]
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, -1)
    return np.round(x * 255).astype(np.uint8)


# -----------------------------------------------------------------------------
# the latent cache of the picture pools

def latent_cache(encoder, split, n, cache_dir, batch_size=256, pictures=None, tag=None):
    """The split's first n pool pictures encoded once: float16 [n, N, d], memory-mapped from cache_dir (or,
    given `pictures`, uint8 [n, H, W, 3] such as a folder's picture cache, those, with `tag` naming them).
    The file name carries a hash of the encoder's weights and normalisation (an RAE's latents depend on its
    encoder only, not its decoder), the split, n and the picture size (or the tag): a changed encoder or data
    builds a new cache instead of reading a stale one. Written to a temp file and renamed when complete (two
    runs building the same cache at once both finish, and the last rename wins); a killed build's temp file is
    removed by the next build, and a cache file that does not load with the expected shape is moved aside
    (with a warning naming it) and rebuilt."""
    core = getattr(encoder, 'encoder', encoder)
    h = hashlib.sha1((tag or f'{split},{n},{encoder.res},{POOL_SEED}').encode())
    for k, v in sorted(core.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().float().numpy().tobytes())
    path = Path(cache_dir) / f'latents-{encoder.name}-{split}-{n}-{h.hexdigest()[:12]}.npy'
    shape = (n, encoder.n_tokens, encoder.d_latent)
    if path.exists():
        try:
            cache = np.load(path, mmap_mode='r')
            if cache.shape == shape and cache.dtype == np.float16:
                return cache
            why = f"it holds {cache.dtype} {cache.shape}, not float16 {shape}"
        except (ValueError, OSError, EOFError) as e:
            why = f"it does not load ({e})"
        aside = path.with_name(path.name + '.corrupt')
        os.replace(path, aside)
        print(f"warning: latent cache {path} is unusable ({why}): moved to {aside.name}, rebuilding it",
              file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path.parent, re.escape(path.stem))
    tmp = path.with_name(f'{path.stem}.{os.getpid()}.tmp.npy')  # per process: runs may share cache_dir
    out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float16, shape=shape)
    device = next(encoder.buffers()).device   # every encoder has its normalisation buffers
    with torch.no_grad():
        for i in tqdm(range(0, n, batch_size), desc=f'encoding {n} {split} pictures ({encoder.name})'):
            images = (world_images(split, min(i + batch_size, n), encoder.res, start=i) if pictures is None
                      else np.asarray(pictures[i:i + batch_size]))
            out[i:i + len(images)] = encoder.encode(image_tensor(images).to(device)).float().cpu().numpy()
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode='r')


class WorldData:
    """Batches of packed world documents. `get(split, step, index)` is deterministic in its arguments.
    images / videos (folders.py): a folder of captioned pictures replaces the world's pictures in
    caption->image and image->caption documents, a folder of clips the world's in video and action ones."""

    def __init__(self, tok, encoder, block_size, batch_size, mixture, seed=1337, p_uncond=0.1, text=None,
                 n_images=16384, cache_dir='cache', video_frames=5, images=None, videos=None, shards=None,
                 qa=None, action_drop=0.0):
        self.tok, self.encoder, self.T, self.B = tok, encoder, block_size, batch_size
        self.kinds, self.probs = parse_mixture(mixture)
        self.seed, self.p_uncond = seed, p_uncond
        self.n_latent = encoder.n_tokens
        self.text = text  # real text (a str) replaces the world's text documents when given
        self.n_images, self.cache_dir, self.pools = {'train': n_images, 'val': min(N_VAL, n_images)}, cache_dir, {}
        self.video_frames = video_frames
        self.images, self.videos = images, videos
        self.shards = shards  # shard_data.ShardData: streams of image-text, video and text shards, or None
        self.qa = qa   # qa_options: questions per picture, kinds' weights, balance (None: the default)
        self.action_drop = action_drop

    def pool(self, split):
        """(scenes, latents) of a split: what world documents draw their pictures from."""
        if self.images is not None:  # <BOS> caption <BOI> latents <EOI> <EOS>
            return self.images.pool(split, self.encoder, self.tok, self.T - self.n_latent - 4)
        if split not in self.pools:
            n = self.n_images[split]
            self.pools[split] = world_scenes(split, n), latent_cache(self.encoder, split, n, self.cache_dir)
        return self.pools[split]

    def build_caches(self):
        """Every latent cache that batches read (the pools of both splits: the held-out losses read pictures
        whatever the mixture; a video folder's frames), built now: the first time encodes them, once. After
        this, making a batch never runs the encoder on a pool, so background workers never need it."""
        for split in ('train', 'val'):
            if self.shards is None or not self.shards.serves('caption2image'):
                self.pool(split)
            if self.videos is not None and {'video', 'action'} & set(self.kinds):
                self.videos.latents(split, self.video_frames, self.encoder)

    def start_streams(self, n_groups, slots, states):
        """loader.Loader: the shard readers' layout and the checkpoint's reader states (no shards: nothing)."""
        if self.shards is not None:
            self.shards.start_streams(n_groups, slots, states)

    def documents(self, rng, kinds, probs, p_uncond, split):
        while True:
            kind = kinds[rng.choice(len(kinds), p=probs)]
            if self.shards is not None and self.shards.serves(kind):
                yield self.shards.document(kind, split, p_uncond)
            elif kind == 'text' and self.text is not None:
                yield [text_chunk(self.text, rng, self.tok, self.T)]
            elif kind in ('video', 'action') and self.videos is not None:
                room = self.T - self.video_frames * (self.n_latent + 2) - 2
                yield self.videos.document(kind, rng, split, self.video_frames, self.encoder, self.tok, room)
            elif kind in ('video', 'action'):
                yield video_document(kind, rng, split, self.video_frames, self.encoder.res,
                                     self.action_drop if split == 'train' else 0.0)
            else:
                pool = self.pool(split) if kind != 'text' else None
                yield world_document(kind, rng, pool, p_uncond, self.qa)

    def get(self, split, step, index=0, mixture=None):
        kinds, probs = (self.kinds, self.probs) if mixture is None else parse_mixture(mixture)
        if self.shards is not None:  # which readers serve this batch (held-out streams restart at step 0)
            self.shards.begin(split, step, index, mixture or '', lambda j: self.get(split, j, index, mixture))
        rng = np.random.default_rng([self.seed, SPLITS[split], step, index])
        p_uncond = self.p_uncond if split == 'train' else 0.0
        docs = self.documents(rng, kinds, probs, p_uncond, split)
        # first-fit packing: each document goes into the first row with room for it; rows close when
        # several documents in a row fit nowhere (the rest of a row is padding: ~5% instead of ~30%
        # for closing a row at the first document that does not fit)
        rows, free, misses = [[] for _ in range(self.B)], [self.T] * self.B, 0
        while misses < 8:
            d = next(docs)
            n = doc_length(d, self.tok, self.n_latent)
            if n > self.T:
                raise ValueError(f"a world document of {n} tokens does not fit in block_size={self.T}"
                                 + (" (fewer video_frames?)" if sum(isinstance(x, Visual) for x in d) > 1 else ""))
            row = next((i for i in range(self.B) if free[i] >= n), None)
            if row is None:
                misses += 1
                if self.shards is not None:   # a shard sample is not lost: it starts the reader's next batch
                    self.shards.put_back(d)
                continue
            rows[row].append(d)
            free[row] -= n
            misses = 0
        # video frames are drawn fresh (not from the pool): they travel as pixels, encoded on the device
        batch = pack(rows, self.tok, self.T, self.n_latent, self.encoder.d_latent)
        if self.shards is not None:
            batch.streams = self.shards.take_states()
        return batch
