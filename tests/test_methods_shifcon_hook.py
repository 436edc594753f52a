"""model.MoETransformer.residual_hook (None: bit-identical; positions as Hugging Face's hidden_states) and
methods/shifcon.shift_hook: the shift into English's subspace before layer l_f - 1, back before l_b - 1,
on non-English rows only."""
import pytest
import torch

from methods.shifcon import LanguageVectors, shift, shift_hook
from model import MoEConfig, MoETransformer

TINY = dict(vocab_size=64, hidden_size=16, n_layers=4, n_heads=2, n_kv_heads=1, intermediate_size=32, n_experts=4,
            top_k=2, moe_intermediate_size=16, qk_norm=True)


def fresh():
    torch.manual_seed(0)
    return MoETransformer(MoEConfig(**TINY)).eval()


def test_no_hook_and_identity_hook_are_bit_identical_and_positions_match_transformers_hidden_states():
    model, ids = fresh(), torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        plain = model(ids)
        seen = {}
        model.residual_hook = lambda p, x: (seen.__setitem__(p, x.clone()), x)[1]
        hooked = model(ids)
        model.residual_hook = None
    assert torch.equal(plain.logits, hooked.logits) and sorted(seen) == [0, 1, 2, 3, 4]
    assert torch.equal(seen[0], model.embed_tokens(ids))  # position 0: the embeddings
    with torch.no_grad():  # position 4 = the last layer's output: the final norm of it gives the logits
        assert torch.equal(model.lm_head(model.norm(seen[4])), plain.logits)


def vectors(H, langs_positions):
    torch.manual_seed(1)
    v = LanguageVectors()
    for lang in ("en", "sw"):
        for p in langs_positions:
            v.update(lang, p, torch.randn(3, H))
    return v


def test_shift_at_l_f_and_back_at_l_b_on_non_english_rows_only():
    model, ids = fresh(), torch.randint(0, 64, (2, 7))
    v = vectors(16, (2, 4))
    before, after = {}, {}
    hook = shift_hook(v, ["sw", "en"], forward=2, back=4)

    def recording(p, x):
        before[p] = x.clone()
        y = hook(p, x)
        after[p] = y.clone()
        return y
    with torch.no_grad():
        plain = model(ids)
        model.residual_hook = recording
        shifted = model(ids)
        model.residual_hook = None
    # before layer 1 (= l_f - 1): into English's subspace with the l_f vectors; before layer 3: back with l_b's
    want_f = shift(before[1][0].double(), v.vector("sw", 2), v.vector("en", 2)).float()
    assert torch.allclose(after[1][0], want_f, atol=1e-6) and not torch.equal(after[1][0], before[1][0])
    want_b = shift(before[3][0].double(), v.vector("en", 4), v.vector("sw", 4)).float()
    assert torch.allclose(after[3][0], want_b, atol=1e-6)
    assert all(torch.equal(after[p], before[p]) for p in (0, 2, 4))  # nowhere else
    assert torch.equal(shifted.logits[1], plain.logits[1])  # the English row is untouched, bit for bit
    assert not torch.allclose(shifted.logits[0], plain.logits[0])


def test_shift_is_undone_when_the_layers_between_add_nothing():
    """Layers 1 and 2 made identities (attention and experts output 0): with the same vectors at both
    positions, the shift back undoes the shift exactly up to fp32 rounding."""
    model, ids = fresh(), torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        for i in (1, 2):
            model.layers[i].self_attn.o_proj.weight.zero_()
            model.layers[i].mlp.down_proj.zero_()
        plain = model(ids)
        v = LanguageVectors()
        torch.manual_seed(2)
        for lang in ("en", "sw"):
            u = torch.randn(3, 16)
            v.update(lang, 2, u)
            v.update(lang, 4, u)
        model.residual_hook = shift_hook(v, ["sw", "sw"], forward=2, back=4)
        shifted = model(ids)
    assert torch.allclose(shifted.logits, plain.logits, atol=1e-4)
    with pytest.raises(ValueError, match="0 < forward < back"):
        shift_hook(v, ["sw"], forward=4, back=2)
