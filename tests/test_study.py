"""study.py: arms at equal tokens of the kind a study is about, the noise rule that decides what is resolved
and what is trained again, and a whole study run twice (the second time it trains nothing)."""

import json

import pytest

import documents
import study
import tokenizer
from conftest import run_main, run_script


def row(**numbers):
    """A results row holding eval numbers (dotted paths) and an eval.py flag for the prompt count."""
    r = {'eval': {}, 'eval_args': ['--n_prompts=32']}
    for path, v in numbers.items():
        d = r['eval']
        keys = path.split('__')
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = v
    return r


def qa(acc, n=840):
    return row(understanding__accuracy=acc, understanding__n=n)


def test_an_accuracy_needs_two_seeds_that_agree_beyond_two_standard_errors():
    # one seed never settles an accuracy, however far apart
    assert study.within_noise('qa', [qa(0.80)], [qa(0.70)]) == (False, pytest.approx(0.10))
    # 840 questions a seed: the standard error of a two-seed mean difference near 0.7 is ~0.016
    assert study.within_noise('qa', [qa(0.80), qa(0.78)], [qa(0.70), qa(0.71)])[0] is True
    assert study.within_noise('qa', [qa(0.72), qa(0.73)], [qa(0.70), qa(0.71)])[0] is False
    assert study.within_noise('qa', [qa(0.80), qa(0.65)], [qa(0.70), qa(0.71)])[0] is False     # signs differ
    # 32 prompts a seed: 0.10 apart in both seeds is still within 2 standard errors
    gen = lambda v: row(gen_1obj_seen__object=v)
    assert study.within_noise('gen', [gen(0.60), gen(0.62)], [gen(0.50), gen(0.52)])[0] is False


def test_a_loss_difference_is_resolved_beyond_the_seed_to_seed_spread():
    text = lambda v: row(text_loss_per_byte=v)
    assert study.within_noise('text', [text(0.110)], [text(0.125)])[0] is True      # 13%
    assert study.within_noise('text', [text(0.122)], [text(0.124)])[0] is False     # 1.6%
    # two seeds: the same sign in both and beyond each arm's own spread
    assert study.within_noise('text', [text(0.110), text(0.112)], [text(0.125), text(0.124)])[0] is True
    assert study.within_noise('text', [text(0.110), text(0.126)], [text(0.125), text(0.124)])[0] is False


def test_verdicts_name_the_better_arm_for_higher_and_lower_is_better_numbers():
    s = {'compare': [('a', 'b', ['qa', 'text'])]}
    a = {**qa(0.9), 'eval': {**qa(0.9)['eval'], 'text_loss_per_byte': 0.2}}
    b = {**qa(0.5), 'eval': {**qa(0.5)['eval'], 'text_loss_per_byte': 0.1}}
    rows = {'a': [a, a], 'b': [b, b]}                             # two seeds: an accuracy can be settled
    v = {x['metric']: x for x in study.verdicts(s, rows)}
    assert v['qa']['better'] == 'a' and v['text']['better'] == 'b' and v['qa']['resolved'] and v['text']['resolved']


def test_an_arm_repeated_for_one_comparison_brings_the_other_arm_of_a_comparison_it_unsettles():
    text = lambda v: row(text_loss_per_byte=v)
    s = {'compare': [('a', 'b', ['text']), ('b', 'c', ['text'])]}
    rows = {'a': [text(0.100)], 'b': [text(0.110)], 'c': [text(0.111)]}
    assert study.to_repeat(s, rows) == {'b', 'c'}                 # a vs b is 10% apart: beyond the 3% noise
    rows.update(b=[text(0.110), text(0.094)], c=[text(0.111), text(0.095)])
    assert study.to_repeat(s, rows) == {'a'}                      # b's second seed puts a vs b within noise
    rows['a'].append(text(0.099))
    assert study.to_repeat(s, rows) == set()


def test_an_arm_with_added_data_trains_on_as_many_tokens_of_its_kind_as_the_arm_alone():
    tok = tokenizer.get_tokenizer('world')
    mixed = 'qa=0.5,text=0.5'
    steps = study.equal_tokens('qa', 600, mixed, 'qa=1', tok)
    share = documents.token_shares(mixed, tok, 16, 5)['qa']
    assert 0.6 < share < 0.8 and steps * share == pytest.approx(600, rel=0.01)


@pytest.mark.slow
def test_a_study_runs_every_arm_writes_its_table_and_a_second_run_trains_nothing(tmp_path):
    args = ['world', '--preset=smoke', '--repeat=False', '--encoder=pixel', '--n_images=256',
            '--arms=clips_10,clips_100', f'--out_dir={tmp_path}']
    r = run_script('study.py', *args, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '2 to train' in r.stdout
    report = json.load(open(tmp_path / 'study_world.json'))
    assert [a['name'] for a in report['arms']] == ['clips_10', 'clips_100']
    run = report['arms'][-1]['runs'][0]
    assert run['args']['mixture'] == 'action=1' and run['eval']['world_model']['ate'] >= 0
    assert report['comparisons'] and '| 100% action clips |' in (tmp_path / 'study_world.md').read_text()
    r = run_script('study.py', *args)
    assert r.returncode == 0 and '0 to train' in r.stdout


def test_study_refuses_an_unknown_study_and_knobs_it_sets_per_arm():
    r = run_main('study.py', 'encoder')
    assert r.returncode != 0 and 'name one study' in r.stderr
    r = run_main('study.py', 'moe', '--max_iters=5')
    assert r.returncode != 0 and 'sets max_iters for each arm' in r.stderr and 'Traceback' not in r.stderr
    r = run_main('study.py', 'world', '--arms=clips_7')
    assert r.returncode != 0 and 'no arm clips_7 in this study' in r.stderr and 'Traceback' not in r.stderr
