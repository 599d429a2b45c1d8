"""study.py: arms at equal tokens of the kind a study is about, the noise rule that decides what is resolved
and what is trained again, and a whole study run twice (the second time it trains nothing)."""

import json

import pytest

import data
import study
import tokenizer
from conftest import run_script


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


def test_an_accuracy_difference_is_resolved_beyond_two_standard_errors():
    # 840 questions: the standard error of a difference near 0.7 is ~0.022
    assert study.within_noise('qa', [qa(0.80)], [qa(0.70)]) == (True, pytest.approx(0.10))
    assert study.within_noise('qa', [qa(0.72)], [qa(0.70)])[0] is False
    # 32 prompts: 0.10 apart is not resolved
    gen = lambda v: row(gen_1obj_seen__object=v)
    assert study.within_noise('gen', [gen(0.60)], [gen(0.50)])[0] is False


def test_a_loss_difference_is_resolved_beyond_the_seed_to_seed_spread():
    text = lambda v: row(text_loss_per_byte=v)
    assert study.within_noise('text', [text(0.110)], [text(0.125)])[0] is True      # 13%
    assert study.within_noise('text', [text(0.122)], [text(0.124)])[0] is False     # 1.6%
    # two seeds: the same sign in both and beyond each arm's own spread
    assert study.within_noise('text', [text(0.110), text(0.112)], [text(0.125), text(0.124)])[0] is True
    assert study.within_noise('text', [text(0.110), text(0.126)], [text(0.125), text(0.124)])[0] is False


def test_verdicts_name_the_better_arm_for_higher_and_lower_is_better_numbers():
    s = {'compare': [('a', 'b', ['qa', 'text'])]}
    rows = {'a': [{**qa(0.9), 'eval': {**qa(0.9)['eval'], 'text_loss_per_byte': 0.2}}],
            'b': [{**qa(0.5), 'eval': {**qa(0.5)['eval'], 'text_loss_per_byte': 0.1}}]}
    v = {x['metric']: x for x in study.verdicts(s, rows)}
    assert v['qa']['better'] == 'a' and v['text']['better'] == 'b' and v['qa']['resolved'] and v['text']['resolved']


def test_an_arm_repeated_for_one_comparison_brings_the_other_arm_of_a_comparison_it_unsettles():
    gen = lambda v: row(gen_1obj_seen__object=v)
    s = {'compare': [('a', 'b', ['gen']), ('b', 'c', ['gen'])]}
    rows = {'a': [gen(0.22)], 'b': [gen(0.03)], 'c': [gen(0.09)]}
    assert study.to_repeat(s, rows) == {'b', 'c'}                 # a vs b is beyond 2 standard errors
    rows.update(b=[gen(0.03), gen(0.125)], c=[gen(0.09), gen(0.06)])
    assert study.to_repeat(s, rows) == {'a'}                      # b's second seed puts a vs b within noise
    rows['a'].append(gen(0.22))
    assert study.to_repeat(s, rows) == set()


def test_an_arm_with_added_data_trains_on_as_many_tokens_of_its_kind_as_the_arm_alone():
    tok = tokenizer.get_tokenizer('world')
    mixed = 'qa=0.5,text=0.5'
    steps = study.equal_tokens('qa', 600, mixed, 'qa=1', tok)
    share = data.token_shares(mixed, tok, 16, 5)['qa']
    assert 0.6 < share < 0.8 and steps * share == pytest.approx(600, rel=0.01)


@pytest.mark.slow
def test_a_study_runs_every_arm_writes_its_table_and_a_second_run_trains_nothing(tmp_path):
    args = ['world', '--preset=smoke', '--repeat=False', '--encoder=pixel', '--n_images=256',
            f'--out_dir={tmp_path}']
    r = run_script('study.py', *args, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '5 to train' in r.stdout
    report = json.load(open(tmp_path / 'study_world.json'))
    assert [a['name'] for a in report['arms']] == ['clips_0', 'clips_1', 'clips_10', 'clips_25', 'clips_100']
    run = report['arms'][-1]['runs'][0]
    assert run['args']['mixture'] == 'action=1' and run['eval']['world_model']['ate'] >= 0
    assert report['comparisons'] and '| 100% action clips |' in (tmp_path / 'study_world.md').read_text()
    r = run_script('study.py', *args)
    assert r.returncode == 0 and '0 to train' in r.stdout


def test_study_refuses_an_unknown_study_and_knobs_it_sets_per_arm():
    r = run_script('study.py', 'encoder')
    assert r.returncode != 0 and 'name one study' in r.stderr
    r = run_script('study.py', 'moe', '--max_iters=5')
    assert r.returncode != 0 and 'sets max_iters for each arm' in r.stderr and 'Traceback' not in r.stderr
