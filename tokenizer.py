"""
Tokenizers: bytes (no files needed), a BPE learnt from the embedded world's own text (the default), or any
tiktoken encoding for real text. Every one puts the special tokens (<BOS>, <BOI>, <IMG>, ...) right after its
base vocabulary, so an id below `pad` is always text.
"""

import re
from functools import lru_cache

import numpy as np
import tiktoken

import video
import world

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


# GPT-2's pre-tokenisation, in ASCII: a word with its leading space, a number, a run of punctuation, spaces.
WORD_PATTERN = r""" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"""


def world_corpus(n=3000, seed=0):
    """Text of every kind the world writes (stories, captions, questions and answers, motion, actions) drawn
    from training scenes only, so held-out colour-shape pairs never appear here either."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        scene = world.sample_scene(rng)
        q, a = world.question_answer(scene, rng)
        dx, dy = rng.integers(-video.MAX_STEP, video.MAX_STEP + 1, size=2)
        texts += [world.text_document(rng), world.caption(scene, rng), f"q: {q} a: {a}\n",
                  video.format_action(dx, dy), video.format_words(dx, dy)]
    texts += [video.sample_video(rng, 2)[1] for _ in range(n // 10)]
    return texts


def learn_bpe(texts, max_merges=768):
    """Byte-pair encoding learnt on `texts`: start from the 256 bytes and repeatedly merge the most frequent
    adjacent pair within words (ties broken by the pair itself, so the result is deterministic) until every
    word is one token or max_merges is reached. Returns tiktoken's mergeable ranks {bytes: id}."""
    counts = {}
    for text in texts:
        for w in re.findall(WORD_PATTERN, text):
            counts[w] = counts.get(w, 0) + 1
    words = {tuple(bytes([b]) for b in w.encode()): c for w, c in counts.items()}
    ranks = {bytes([i]): i for i in range(256)}
    for _ in range(max_merges):
        pairs = {}
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] = pairs.get(p, 0) + c
        if not pairs:
            break
        a, b = max(pairs, key=lambda p: (pairs[p], p))
        ranks[a + b] = len(ranks)
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = c
        words = merged
    return ranks


@lru_cache(maxsize=None)
def get_tokenizer(name):
    """'world' (the default: a BPE learnt from the world's text, the paper's text is BPE-tokenised too, and
    whole words make every question and caption ~4x shorter than bytes do; any other text still encodes,
    through the byte tokens), 'byte', or a tiktoken encoding such as 'gpt2' (tiktoken fetches its file once)."""
    if name == 'byte':
        return Tokenizer()
    if name == 'world':
        return Tokenizer(tiktoken.Encoding('world', pat_str=WORD_PATTERN, mergeable_ranks=learn_bpe(world_corpus()),
                                           special_tokens={}))
    return Tokenizer(tiktoken.get_encoding(name))
