import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
VECTORS = os.path.join(HERE, "..", "..", "tests", "vectors", "messages.json")


@pytest.fixture(scope="session")
def vectors():
    with open(VECTORS, encoding="utf-8") as f:
        return json.load(f)
