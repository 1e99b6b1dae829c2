"""The repository's docs stand alone: docstrings point to its own pages, which exist."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files():
    for folder in ("relax", "scripts", "tests", "configs"):
        for d, _, names in os.walk(os.path.join(ROOT, folder)):
            for n in names:
                if n.endswith((".py", ".yaml", ".md")):
                    yield os.path.join(d, n)
    yield os.path.join(ROOT, "README.md")


def test_no_reference_to_pages_the_repository_lacks():
    cited = set()
    for path in _files():
        if path == os.path.abspath(__file__):
            continue
        text = open(path).read()
        assert not re.search(r"DESIGN\.md", text), path
        cited.update(re.findall(r"docs/[\w\-]+\.md", text))
    assert cited, "docstrings cite docs/protocol.md"
    for page in cited:
        assert os.path.isfile(os.path.join(ROOT, page)), page
