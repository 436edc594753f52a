"""evaluation/routing.py without a model: the band rule (one rule; the edge windows only on request)."""
import numpy as np
import pytest

import evaluation.routing as R


def test_choose_band_is_the_bottom_of_the_u():
    u = [0.5, 0.2, 0.1, 0.15, 0.4, 0.6]
    assert R.choose_band(u, 1) == (2, 2) and R.choose_band(u, 2) == (2, 3) and R.choose_band(u, 3) == (1, 3)
    assert R.choose_band([1, 1, 1], 2, edges=True) == (0, 1)  # ties: the earliest
    assert R.choose_band(u, 6, edges=True) == (0, 5)
    with pytest.raises(SystemExit):
        R.choose_band(u, 7, edges=True)
    rows = [dict(model="m", lang=l, layer=k + 10, js_norm=v + d) for l, d in (("sw", 0), ("hi", 0.1))
            for k, v in enumerate(u)]
    b = R.band_from_rows(rows, 2)
    assert (b["start"], b["end"]) == (12, 13) and b["mean"] == pytest.approx(0.175)  # decoder indices


def test_band_leaves_out_the_edges_unless_asked():
    """A curve whose lowest window touches the first layer: all windows (width 2) have means 0.175 (layers
    0-1), 0.25, 0.225, 0.325, 0.25; the middle ones (starts 1..3) 0.25, 0.225, 0.325 -> layers 2-3."""
    curve = [0.05, 0.3, 0.2, 0.25, 0.4, 0.1]
    assert R.choose_band(curve, 2) == (2, 3)
    assert R.choose_band(curve, 2, edges=True) == (0, 1)
    assert R.choose_band(curve[::-1], 2, edges=True) == (4, 5) and R.choose_band(curve[::-1], 2) == (2, 3)
    with pytest.raises(SystemExit, match="no middle window"):
        R.choose_band([1, 1, 1], 2)
    rows = [dict(model="m", lang="sw", layer=k, js_norm=v) for k, v in enumerate(curve)]
    assert (R.band_from_rows(rows, 2)["start"], R.band_from_rows(rows, 2, edges=True)["start"]) == (2, 0)


def test_band_rule_against_a_loop():
    """The rule written out: every window of `width` layers without layer 0 and layer L-1, lowest mean,
    earliest on ties."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        L, width = int(rng.integers(3, 12)), int(rng.integers(1, 4))
        curve = rng.integers(0, 5, size=L) / 4  # coarse values: many ties
        windows = [(float(np.mean(curve[s:s + width])), s) for s in range(1, L - width)]
        if not windows:
            continue
        best = min(windows)[1]  # (mean, start): the earliest among equal means
        assert R.choose_band(curve, width) == (best, best + width - 1)
