"""
Data: tokenizers, documents from the embedded world (or real text), and packing into fixed-length
interleaved sequences.

A document is a list of segments: text (str) and visual blocks (Visual). In the token stream a visual block is
`<BOI>` + N latent slots + `<EOI>`; every document is `<BOS> ... <EOS>`. Several documents are packed into one
row of length T; what is left at the end of a row is padding.

What later tokens see of a noised image (DESIGN.md) — the policy of this repo:
    a visual block is either a TARGET (it is noised with its own t and carries the flow loss: the image of a
    caption->image document) or CONTEXT (it is fed clean, t = 1, and carries no flow loss: the image of an
    image->caption or question/answer document). So text that reads an image always reads it clean, and no
    token is ever trained on a noised picture it is supposed to describe.

Every batch is a pure function of (seed, split, step, index): resuming a run needs only the step, and DDP
ranks read disjoint streams by asking for different indices (train.py: index = micro * world + rank).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

import world

# -----------------------------------------------------------------------------
# tokenizers

SPECIALS = ('<PAD>', '<BOS>', '<EOS>', '<BOI>', '<EOI>', '<IMG>')  # <IMG> fills latent slots in `tokens`


class Tokenizer:
    """Byte-level by default (no files needed); or any tiktoken Encoding (GPT-2 BPE for real text).
    Special tokens take the ids right after the base vocabulary."""

    def __init__(self, encoding=None):
        self.encoding = encoding
        base = 256 if encoding is None else encoding.n_vocab
        for i, name in enumerate(SPECIALS):
            setattr(self, name.strip('<>').lower(), base + i)  # self.pad, self.bos, self.eos, self.boi, ...
        self.vocab_size = base + len(SPECIALS)

    def encode(self, text):
        if self.encoding is None:
            return list(text.encode('utf-8'))
        return self.encoding.encode_ordinary(text)

    def decode(self, ids):
        ids = [i for i in ids if i < self.pad]  # specials are structure, not text
        if self.encoding is None:
            return bytes(ids).decode('utf-8', errors='replace')
        return self.encoding.decode(ids)


def get_tokenizer(name):
    """'byte', or the name of a tiktoken encoding such as 'gpt2' (tiktoken fetches its BPE file once)."""
    if name == 'byte':
        return Tokenizer()
    import tiktoken
    return Tokenizer(tiktoken.get_encoding(name))


# -----------------------------------------------------------------------------
# documents


@dataclass
class Visual:
    image: object          # the raw picture (uint8 [H, W, 3]); encoded to latents when a batch is built
    target: bool           # True: noised + flow loss; False: clean context (see the policy above)
    latents: torch.Tensor = None  # [N, d], filled by the encoder


def world_document(kind, rng, p_uncond=0.0):
    """One document of the embedded world. kind: text | caption2image | image2caption | qa."""
    if kind == 'text':
        return [world.text_document(rng)]
    scene = world.sample_scene(rng)
    image = world.render(scene, rng=rng)
    if kind == 'caption2image':
        # classifier-free guidance: 10% of generation documents lose their caption (PAPER.md §4)
        text = '' if rng.random() < p_uncond else world.caption(scene, rng)
        return [text, Visual(image, target=True)] if text else [Visual(image, target=True)]
    if kind == 'image2caption':
        return [Visual(image, target=False), world.caption(scene, rng)]
    if kind == 'qa':
        q, a = world.question_answer(scene, rng)
        return [Visual(image, target=False), f"q: {q} a: {a}"]
    raise ValueError(f"unknown document kind {kind!r}")


def parse_mixture(spec):
    """'text=0.3,caption2image=0.4,...' -> (kinds, probabilities); a clear error on anything malformed."""
    kinds, weights = [], []
    for part in spec.split(','):
        name, _, w = part.partition('=')
        try:
            w = float(w)
        except ValueError:
            raise ValueError(f"mixture entry {part!r} is not name=weight") from None
        if name not in ('text', 'caption2image', 'image2caption', 'qa') or w < 0:
            raise ValueError(f"mixture entry {part!r}: unknown kind or negative weight")
        kinds.append(name)
        weights.append(w)
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"mixture {spec!r} has no positive weight")
    return kinds, [w / total for w in weights]


# -----------------------------------------------------------------------------
# packing


@dataclass
class Batch:
    tokens: torch.Tensor      # (B, T) long: text ids; <IMG> at latent slots
    targets: torch.Tensor     # (B, T) long: next text token, -1 where there is no LM loss
    modality: torch.Tensor    # (B, T) long: 0 text, 1 latent
    block: torch.Tensor       # (B, T) long: visual block id within the row, -1 for text
    doc: torch.Tensor         # (B, T) long: document id within the row, -1 for padding
    pos: torch.Tensor         # (B, T) long: position within the document (RoPE)
    lat_target: torch.Tensor  # (B, T) bool: latent slot of a TARGET block (noised, flow loss)
    latents: torch.Tensor     # (B, T, d) float: clean latents at latent slots, 0 elsewhere

    def to(self, device):
        return Batch(*(getattr(self, f).to(device, non_blocking=True) for f in self.__dataclass_fields__))


def doc_length(doc, tok, n_latent):
    return 2 + sum(len(tok.encode(s)) if isinstance(s, str) else n_latent + 2 for s in doc)


def pack(rows, tok, T, d_latent):
    """rows: list of lists of documents (latents already filled) -> Batch. Each row must fit in T."""
    B = len(rows)
    tokens = torch.full((B, T), tok.pad, dtype=torch.long)
    modality = torch.zeros(B, T, dtype=torch.long)
    block = torch.full((B, T), -1, dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    lat_target = torch.zeros(B, T, dtype=torch.bool)
    latents = torch.zeros(B, T, d_latent)
    for b, docs in enumerate(rows):
        i, n_blocks = 0, 0
        for d, segments in enumerate(docs):
            start = i
            ids = [tok.bos]
            for s in segments:
                if isinstance(s, str):
                    ids += tok.encode(s)
                    continue
                ids.append(tok.boi)
                j = i + len(ids)
                n = s.latents.shape[0]
                tokens[b, i:j] = torch.tensor(ids)
                tokens[b, j:j + n] = tok.img
                modality[b, j:j + n] = 1
                block[b, j:j + n] = n_blocks
                lat_target[b, j:j + n] = s.target
                latents[b, j:j + n] = s.latents
                n_blocks += 1
                i, ids = j + n, [tok.eoi]
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
    return Batch(tokens, targets, modality, block, doc, pos, lat_target, latents)


def unpack(batch, tok, row):
    """The documents of one row, as packed: the inverse of pack (text decoded, latents sliced)."""
    docs = []
    toks, mod, docid = batch.tokens[row], batch.modality[row], batch.doc[row]
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
                j = k + 1
                while mod[j] == 1:
                    j += 1
                segments.append(Visual(None, bool(batch.lat_target[row, k + 1]), batch.latents[row, k + 1:j]))
                k = j + 1  # skip <EOI>
                continue
            text.append(int(toks[k]))
            k += 1
        if text:
            segments.append(tok.decode(text))
        docs.append(segments)
    return docs


def load_text(source):
    """Real text from a local file or an http(s) URL (fetched with requests)."""
    if source.startswith(('http://', 'https://')):
        import requests
        try:
            r = requests.get(source, timeout=30)
            r.raise_for_status()
        except requests.RequestException as e:
            raise RuntimeError(f"could not fetch text from {source}: {e}") from None
        return r.text
    try:
        with open(source, encoding='utf-8') as f:
            return f.read()
    except OSError as e:
        raise FileNotFoundError(f"cannot read text source {source}: {e.strerror}") from None


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


class WorldData:
    """Batches of packed world documents. `get(split, step, index)` is deterministic in its arguments."""

    SPLITS = {'train': 0, 'val': 1}

    def __init__(self, tok, encoder, block_size, batch_size, mixture, seed=1337, p_uncond=0.1, text=None):
        self.tok, self.encoder, self.T, self.B = tok, encoder, block_size, batch_size
        self.kinds, self.probs = parse_mixture(mixture)
        self.seed, self.p_uncond = seed, p_uncond
        self.n_latent = encoder.n_tokens
        self.text = text  # real text (a str) replaces the world's text documents when given

    def documents(self, rng, kinds, probs, p_uncond):
        while True:
            kind = kinds[rng.choice(len(kinds), p=probs)]
            if kind == 'text' and self.text is not None:
                yield [text_chunk(self.text, rng, self.tok, self.T)]
            else:
                yield world_document(kind, rng, p_uncond)

    def get(self, split, step, index=0, mixture=None):
        kinds, probs = (self.kinds, self.probs) if mixture is None else parse_mixture(mixture)
        rng = np.random.default_rng([self.seed, self.SPLITS[split], step, index])
        p_uncond = self.p_uncond if split == 'train' else 0.0
        docs = self.documents(rng, kinds, probs, p_uncond)
        # first-fit packing: each document goes into the first row with room for it; rows close when
        # several documents in a row fit nowhere (the rest of a row is padding: ~5% instead of ~30%
        # for closing a row at the first document that does not fit)
        rows, free, misses = [[] for _ in range(self.B)], [self.T] * self.B, 0
        while misses < 8:
            d = next(docs)
            n = doc_length(d, self.tok, self.n_latent)
            if n > self.T:
                raise ValueError(f"a world document of {n} tokens does not fit in block_size={self.T}")
            row = next((i for i in range(self.B) if free[i] >= n), None)
            if row is None:
                misses += 1
                continue
            rows[row].append(d)
            free[row] -= n
            misses = 0
        visuals = [s for r in rows for d in r for s in d if isinstance(s, Visual)]
        if visuals:
            latents = self.encoder.encode(image_tensor([v.image for v in visuals]))
            for v, z in zip(visuals, latents):
                v.latents = z
        return pack(rows, self.tok, self.T, self.encoder.d_latent)


def fit_encoder(encoder, n_images=512, seed=0):
    """Measure the encoder's latent normalisation on a fixed set of training images (deterministic)."""
    rng = np.random.default_rng([seed, 99])
    images = [world.render(world.sample_scene(rng), encoder.res, rng=rng) for _ in range(n_images)]
    return encoder.fit(image_tensor(images))
