"""Shared fixtures: the shipped tokenizer and the tiny random vision tower."""
from __future__ import annotations

import pytest

from model.tokenization import load_tokenizer
from model.vision import load_vision_tower


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_tower():
    return load_vision_tower("random-tiny")
