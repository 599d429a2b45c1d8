"""tokenizer.py (bytes, the world BPE, any tiktoken encoding) and data.py (world documents, the mixture)."""

import numpy as np
import pytest

import documents
import tokenizer
import world


def test_byte_tokenizer_round_trips_and_has_specials_after_the_bytes():
    tok = tokenizer.Tokenizer()
    s = 'a red circle, top left. ünïcode'
    assert tok.decode(tok.encode(s)) == s
    assert sorted([tok.pad, tok.bos, tok.eos, tok.boi, tok.eoi, tok.img]) == list(range(256, 262))
    assert tok.vocab_size == 262


def test_world_tokenizer_keeps_world_words_whole_and_still_encodes_any_text():
    tok = tokenizer.get_tokenizer('world')
    line = 'q: where is the blue circle? a: top left\n'
    ids = tok.encode(line)
    assert [tok.decode([i]) for i in ids][-3:] == [' top', ' left', '\n'] and len(ids) == 13
    for s in (line, 'action: dx=+2, dy=-1', 'Hello, wörld! 123 \t x'):
        assert tok.decode(tok.encode(s)) == s
    assert tok.pad == tok.encoding.n_vocab and tok.vocab_size < 1024


def test_bpe_learning_is_deterministic_and_merges_the_most_frequent_pair_first():
    texts = ['the cat', 'the hat', 'the mat'] * 3
    ranks = tokenizer.learn_bpe(texts)
    assert ranks == tokenizer.learn_bpe(texts)
    assert ranks[b'th'] == 256 and ranks[b'the'] == 257   # th, he and at all occur 9 times: ties go to the larger pair
    assert b' cat' in ranks and b'the' in ranks and b' the' not in ranks   # words stay within pre-tokens


def test_tiktoken_tokenizer_wraps_a_bpe_encoding_without_downloading():
    import tiktoken
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b'ab'] = 256
    enc = tiktoken.Encoding('tiny', pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={})
    tok = tokenizer.Tokenizer(enc)
    ids = tok.encode('abab c')
    assert ids[:2] == [256, 256] and tok.decode(ids) == 'abab c'
    assert tok.pad == 257 and tok.vocab_size == 257 + 6


def test_qa_documents_ask_several_questions_about_their_picture_one_per_line():
    scene = world.sample_scene(np.random.default_rng(3), 3)
    pool = ([scene], np.zeros((1, 64, 48), np.float16))
    picture, text = documents.world_document('qa', np.random.default_rng(4), pool)
    assert isinstance(picture, documents.Visual) and not picture.target  # clean context: read, not generated
    replay = np.random.default_rng(4)
    replay.integers(1)  # the draw of the picture from the pool
    expected = [world.question_answer(scene, replay) for _ in range(documents.QA_PER_PICTURE)]
    assert text.split('\n') == [f"q: {q} a: {a}" for q, a in expected] and documents.QA_PER_PICTURE > 1


def test_mixture_spec_errors_are_clear():
    assert documents.parse_mixture('text=1,qa=3') == (['text', 'qa'], [0.25, 0.75])
    for bad in ('text', 'movie=1', 'text=-1', 'text=0'):
        with pytest.raises(ValueError):
            documents.parse_mixture(bad)


def qa_doc_lines(seed, qa, n_objects=3):
    scene = world.sample_scene(np.random.default_rng(seed), n_objects)
    pool = ([scene], np.zeros((1, 16, 8), np.float16))
    _, text = documents.world_document('qa', np.random.default_rng(seed), pool, qa=qa)
    return scene, [line[3:].split(' a: ') for line in text.split('\n')]


def test_qa_options_default_to_none_and_parse_kind_weights():
    assert documents.qa_options({}) is None
    assert documents.qa_options(dict(qa_per_picture=3, qa_kinds='', qa_balance=False)) is None
    per, p, balance = documents.qa_options(dict(qa_per_picture=6, qa_kinds='shape=3,is_there=0', qa_balance=True))
    assert per == 6 and balance and np.isclose(p.sum(), 1)
    assert p[world.QUESTION_KINDS.index('shape')] == 3 * p[0] and p[world.QUESTION_KINDS.index('is there')] == 0
    for bad in ('shape', 'shapes=1', 'shape=-1', 'color=0,shape=0,place=0,count=0,size=0,is_there=0,anything_at=0'):
        with pytest.raises(ValueError):
            documents.qa_options(dict(qa_kinds=bad))


def test_balanced_yes_no_questions_come_in_pairs_about_one_picture_answered_both_ways_and_truly():
    qa = documents.qa_options(dict(qa_per_picture=4, qa_kinds='color=0,shape=0,place=0,count=0,size=0', qa_balance=True))
    answers = []
    for seed in range(60):
        scene, lines = qa_doc_lines(seed, qa, n_objects=1 + seed % 3)
        assert len(lines) == 4
        for (q1, a1), (q2, a2) in zip(lines[::2], lines[1::2]):   # two pairs: one kind each, yes and no
            assert {a1, a2} == {'yes', 'no'} and q1.split(' ')[2] == q2.split(' ')[2]
        for q, a in lines:   # every answer is true of the picture
            if q.startswith('is there anything'):
                place = world.PLACES.index(q[len('is there anything at the '):-1])
                assert (a == 'yes') == any(o.place == place for o in scene)
            else:
                color, shape = q[len('is there a '):-1].split(' ')
                assert (a == 'yes') == any((o.color, o.shape) == (color, shape) for o in scene)
                assert (color, shape) not in world.HELDOUT_COMBOS
        answers += [a for _, a in lines]
    assert answers.count('yes') == answers.count('no')


def test_qa_kind_weights_and_questions_per_picture_shape_the_documents():
    qa = documents.qa_options(dict(qa_per_picture=5, qa_kinds='color=0,place=0,count=0,size=0,is_there=0,anything_at=0'))
    for seed in range(10):
        _, lines = qa_doc_lines(seed, qa)
        assert len(lines) == 5 and all(q.startswith('what shape') for q, _ in lines)
    # an odd count: the last yes/no question is a single one; kinds of the default weights all occur
    qa = documents.qa_options(dict(qa_per_picture=3, qa_balance=True))
    kinds = set()
    for seed in range(100):
        _, lines = qa_doc_lines(seed, qa)
        assert len(lines) == 3
        kinds |= {' '.join(q.split(' ')[:3]) for q, _ in lines}
    assert len(kinds) == 7
