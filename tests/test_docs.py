"""The front door and the lab notebook: the README stays short and opens with a picture, every link in the
README and docs/ resolves to a file of the repository, no tracked file names an issue a clone cannot see or a
path outside the repository, and the committed study tables are what study.py writes from their JSON."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ('encoders', 'synergy', 'world', 'moe')
# [text](target) and ![alt](target), <img src="target">, <a href="target">
LINK = re.compile(r'!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)|(?:src|href)="([^"]+)"')


def pages():
    return [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]


def tracked():
    """The tracked files (git ls-files, as the index has them) that exist in the working tree; none when this
    is not a git checkout."""
    if shutil.which('git') is None or not (ROOT / '.git').exists():
        return []
    out = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split('\0') if p and (ROOT / p).is_file()]


def test_readme_is_a_front_door():
    lines = (ROOT / 'README.md').read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: what is not the front door goes to docs/"
    first = '\n'.join(lines[:30])
    assert re.search(r'!\[[^\]]*\]\([^)]+\.(png|gif|jpg|svg)\)|<img [^>]*src="[^"]+"', first), \
        "no picture within README.md's first 30 lines"


@pytest.mark.parametrize('page', pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    text = page.read_text()
    text = re.sub(r'```.*?```', '', text, flags=re.S)       # commands in code blocks are not links
    bad = []
    for m in LINK.finditer(text):
        target = (m.group(1) or m.group(2)).split('#')[0]
        if not target or re.match(r'[a-z][a-z0-9+.-]*:', target):      # an anchor, or http(s):, mailto:
            continue
        path = (page.parent / target).resolve()
        if not path.exists() or ROOT not in (path, *path.parents):
            bad.append(target)
    assert not bad, f"{page.relative_to(ROOT)} links to files that are not in the repository: {bad}"


def test_no_issue_numbers_or_paths_outside_the_repository():
    """A clone cannot see the tracker's issues, nor ../shared: neither belongs in the tracked files."""
    issue, shared = re.compile(r'issue #?[0-9]', re.I), '../shared'
    found = []
    for rel in tracked():
        if rel.startswith('tests/'):
            continue
        raw = (ROOT / rel).read_bytes()
        if b'\0' in raw[:8192]:                    # binary: weights, pictures
            continue
        text = raw.decode('utf-8', errors='replace')
        for n, line in enumerate(text.splitlines(), 1):
            if issue.search(line) or shared in line:
                found.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not found, "say what it was, not its issue number; no path outside the repository:\n" + '\n'.join(found)


@pytest.mark.parametrize('name', STUDIES)
def test_study_tables_are_generated(name, tmp_path, monkeypatch):
    """docs/study_<name>.md is exactly what `python study.py <name> --report_only=True --out_dir=docs` writes
    from docs/study_<name>.json (a copy of the JSON in tmp_path, so docs/ is not touched)."""
    import study
    shutil.copy(ROOT / 'docs' / f'study_{name}.json', tmp_path)
    monkeypatch.chdir(ROOT)
    study.main([name, '--report_only=True', f'--out_dir={tmp_path}'])
    written = (tmp_path / f'study_{name}.md').read_text()
    committed = (ROOT / 'docs' / f'study_{name}.md').read_text()
    assert written == committed, f"docs/study_{name}.md is not what study.py writes from its JSON: regenerate it"
    assert '| comparison |' in written and written.count('\n|') > 5
    if name == 'moe':
        assert 'Experts of the moe_modality arm by layer' in written    # the 'extra' table comes out too
