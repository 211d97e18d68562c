"""Fixtures shared by the draft tests: a tiny target with learnable text and a draft head
trained on it (training takes ~14 s, so a worker does it once)."""

from __future__ import annotations

import pytest
from helpers import successor_model, trained_head


@pytest.fixture(scope="session")
def successor_target():
    return successor_model(40, eos=(0,))


@pytest.fixture(scope="session")
def successor_trained(successor_target):
    """(HeadConfig, params with d2t, Trainer, records): 60 steps over 24 of the 40 tokens."""
    return trained_head(successor_target, draft_vocab=24)
