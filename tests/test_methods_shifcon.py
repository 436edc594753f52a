"""Tests for methods/shifcon.py: numpy float64 / scipy references, gradcheck, hand-computed language vectors."""

import io

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from methods.shifcon import (LanguageVectors, mean_shifted_targets, pool_hidden, sentence_vectors, shifcon_contrastive,
                             shifcon_loss, shift, symmetric_info_nce)

F64 = torch.float64


def np_info_nce(e, g, scale):
    logits = scale * np.asarray(e, np.float64) @ np.asarray(g, np.float64).T
    d = np.arange(len(logits))
    row = np.mean(logsumexp(logits, axis=1) - logits[d, d])
    col = np.mean(logsumexp(logits, axis=0) - logits[d, d])
    return 0.5 * (row + col)


def np_sentence(h, mask):
    h, m = np.asarray(h, np.float64), np.asarray(mask, np.float64)
    pooled = np.stack([h[b][m[b] == 1].mean(0) for b in range(len(h))])
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def rand_side(seed, B=4, T=5, H=6, P=3):
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(B, T, H, generator=g, dtype=F64) for _ in range(P)]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, T - 2:] = 0
    mask[B - 1, :1] = 0
    return hidden, mask


def test_pool_and_sentence_vectors_match_numpy():
    (h, *_), mask = rand_side(0)
    ref = np_sentence(h, mask)
    np.testing.assert_allclose(sentence_vectors(h, mask).numpy(), ref, rtol=1e-13)
    np.testing.assert_allclose(pool_hidden(h).numpy(), h.numpy().mean(1), rtol=1e-13)
    with pytest.raises(ValueError, match="mask_BT"):
        pool_hidden(h, mask[:, :2])


def test_shift_hand_example_and_round_trip():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=F64)
    v_t, v_en = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([2.0, 0.0], dtype=F64)
    assert shift(h, v_t, v_en).tolist() == [[[2.5, 3.0], [4.5, 5.0]]]
    assert torch.allclose(shift(shift(h, v_t, v_en), v_en, v_t), h, rtol=0, atol=1e-15)


def test_mean_shifted_targets_share_englishs_batch_mean():
    (e, *_), m = rand_side(1)
    (t, *_), _ = rand_side(2)
    u_e, u_t = sentence_vectors(e, m), sentence_vectors(t, m)
    g = mean_shifted_targets(u_e, u_t)
    np.testing.assert_allclose(g.mean(0).numpy(), u_e.mean(0).numpy(), atol=1e-15)
    np.testing.assert_allclose((g - g.mean(0)).numpy(), (u_t - u_t.mean(0)).numpy(), atol=1e-15)  # spread kept


@pytest.mark.parametrize("scale", [1.0, 0.3, 5.0])
def test_symmetric_info_nce_matches_scipy_reference(scale):
    g = torch.Generator().manual_seed(3)
    e, t = torch.randn(5, 7, generator=g, dtype=F64), torch.randn(5, 7, generator=g, dtype=F64)
    assert symmetric_info_nce(e, t, scale).item() == pytest.approx(np_info_nce(e, t, scale), rel=1e-13)


def test_symmetric_info_nce_is_symmetric_and_small_for_matched_pairs():
    g = torch.Generator().manual_seed(4)
    e, t = torch.randn(6, 8, generator=g, dtype=F64), torch.randn(6, 8, generator=g, dtype=F64)
    assert symmetric_info_nce(e, t).item() == pytest.approx(symmetric_info_nce(t, e).item(), rel=1e-14)
    u = torch.nn.functional.normalize(e, dim=-1)
    assert symmetric_info_nce(20 * u, u).item() < 1e-3 < symmetric_info_nce(20 * u, u.roll(1, 0)).item()


def test_shifcon_contrastive_matches_numpy_end_to_end():
    en, en_mask = rand_side(5, T=5)
    tgt, tgt_mask = rand_side(6, T=7)
    ref = []
    for e_h, t_h in zip(en, tgt):
        u_e, u_t = np_sentence(e_h, en_mask), np_sentence(t_h, tgt_mask)
        ref.append(np_info_nce(u_e, u_t - u_t.mean(0) + u_e.mean(0), 1.0))
    got = shifcon_contrastive(en, en_mask, tgt, tgt_mask)
    assert got.item() == pytest.approx(np.mean(ref), rel=1e-13)
    with pytest.raises(ValueError, match="same non-zero number of positions"):
        shifcon_contrastive(en, en_mask, tgt[:2], tgt_mask)


def test_gradcheck_in_float64():
    g = torch.Generator().manual_seed(7)
    e = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(3, 4, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: symmetric_info_nce(a, b, 0.7), (e, t))
    en, en_mask = rand_side(8, B=3, T=3, H=4, P=2)
    tgt, tgt_mask = rand_side(9, B=3, T=4, H=4, P=2)
    ins = [x.requires_grad_(True) for x in en + tgt]
    assert torch.autograd.gradcheck(lambda a, b, c, d: shifcon_contrastive([a, b], en_mask, [c, d], tgt_mask), ins)


def test_loss_weights():
    assert shifcon_loss(torch.tensor(2.0), torch.tensor(3.0)).item() == pytest.approx(0.5 * 2 + 2.0 * 3)


def test_language_vectors_running_mean_of_batch_means():
    lv = LanguageVectors()
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)  # batch mean (2/3, 2/3)
    b = torch.tensor([[3.0, -1.0]])  # batch mean (3, -1); each batch counts once, whatever its size
    lv.update("sw", 12, a)
    lv.update("sw", 12, b)
    lv.update("en", 12, b)
    assert lv.vector("sw", 12).tolist() == pytest.approx([(2 / 3 + 3) / 2, (2 / 3 - 1) / 2])
    assert lv.vector("en", 12).tolist() == [3.0, -1.0]
    assert not lv.vector("sw", 12).requires_grad
    s, c = lv.sums_and_counts()[("sw", 12)]
    assert c == 2 and s.tolist() == pytest.approx([2 / 3 + 3, 2 / 3 - 1])
    buf = io.BytesIO()
    torch.save(lv.state_dict(), buf)
    buf.seek(0)
    back = LanguageVectors()
    back.load_state_dict(torch.load(buf))
    assert torch.equal(back.vector("sw", 12), lv.vector("sw", 12)) and back.sums_and_counts()[("sw", 12)][1] == 2
    with pytest.raises(KeyError, match="'hi' at position 15"):
        lv.vector("hi", 15)
    with pytest.raises(ValueError, match="hidden size 3"):
        lv.update("sw", 12, torch.zeros(2, 3))
