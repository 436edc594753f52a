"""experts.py: the grouped-matmul lookup finds torch's private op where the public one is absent."""
import torch
import torch.nn.functional as F

import experts


def test_grouped_mm_falls_back_to_the_private_op(monkeypatch):
    assert hasattr(torch, "_grouped_mm"), "this torch has no private grouped matmul to fall back to"
    monkeypatch.delattr(F, "grouped_mm", raising=False)
    found = experts.find_grouped_mm()
    assert found is torch._grouped_mm
    # and it computes what the per-expert matmuls do (rows 0-2 to expert 0, rows 3-4 to expert 1)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 8, generator=g), torch.randn(2, 8, 12, generator=g)  # rows of 16-byte multiples
    out = found(x, w, offs=torch.tensor([3, 5], dtype=torch.int32))
    torch.testing.assert_close(out, torch.cat([x[:3] @ w[0], x[3:] @ w[1]]))


def test_no_grouped_mm_at_all_gives_none(monkeypatch):
    monkeypatch.delattr(F, "grouped_mm", raising=False)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    assert experts.find_grouped_mm() is None
