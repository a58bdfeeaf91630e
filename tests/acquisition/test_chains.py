"""Acquisition chains: names, validation and in-memory selection."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.acquisition import Chain, parse_chain, select_by_values


def test_chain_names_parse_and_refuse_clearly() -> None:
    assert parse_chain("lplgrad+power", beta=2.0) == Chain("lplgrad", "power", 2.0)
    assert parse_chain("badge").is_set_function and parse_chain("entropy").name == "entropy"
    with pytest.raises(ValueError, match="unknown strategy 'bald'"):
        parse_chain("bald")
    with pytest.raises(ValueError, match="unknown stochastic mode 'gumbel'"):
        parse_chain("entropy+gumbel")
    with pytest.raises(ValueError, match="badge has no stochastic variant"):
        parse_chain("badge+power")
    with pytest.raises(ValueError, match="use mode softmax or softrank"):
        parse_chain("margin+power")


def test_top_k_and_stochastic_draws_pick_from_the_values() -> None:
    keys = [f"k{i:02d}" for i in range(40)]
    rows = {"key": keys, "entropy": np.linspace(0.0, 2.0, 40), "score": np.linspace(1.0, 5.0, 40)}
    assert select_by_values(parse_chain("entropy"), rows, 3, seed=0) == ["k39", "k38", "k37"]
    drawn = select_by_values(parse_chain("lplgrad+power", beta=8.0), rows, 10, seed=0)
    assert len(set(drawn)) == 10 and drawn == select_by_values(parse_chain("lplgrad+power", beta=8.0), rows, 10, seed=0)
    # A sharp power draw favours high scores but is not the top-k.
    assert np.mean([int(k[1:]) for k in drawn]) > 25 and drawn != keys[::-1][:10]
    softrank = select_by_values(parse_chain("entropy+softrank", beta=1.0), rows, 10, seed=3)
    assert len(set(softrank)) == 10 and softrank != select_by_values(parse_chain("entropy+softrank"), rows, 10, seed=4)
    with pytest.raises(ValueError, match="set function"):
        select_by_values(parse_chain("coreset"), rows, 3, seed=0)
