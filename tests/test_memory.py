"""memory.py's measurements against hand computations on toy models (seconds)."""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from memory import LiveBytes, block_activation_bytes  # noqa: E402
from model import MoEConfig  # noqa: E402

# Layer 0 dense (SwiGLU 24 wide), layer 1 MoE (4 experts, 16 wide); vocab 100 does not divide by 8.
TOY = dict(vocab_size=100, hidden_size=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8,
           intermediate_size=24, n_experts=4, top_k=2, moe_intermediate_size=16, mlp_only_layers=[0],
           expert_impl="grouped")


def test_sharded_states_match_hand_count_over_fake_world_of_8():
    # By hand: FSDP2 shards dim 0 into ceil(d0 / 8) rows per rank (padding the last ranks), so
    # rank 0 holds ceil(d0 / 8) * (other dims) elements of each parameter:
    #   embed (100, 16) -> 13 * 16 = 208;  lm_head (100, 16) -> 208;  final norm (16,) -> 2
    #   per layer: 2 norms (16,) -> 2 + 2; q (16, 16) -> 32; k, v (8, 16) -> 16 + 16; o (16, 16) -> 32
    #   layer 0 SwiGLU: gate, up (24, 16) -> 3 * 16 each; down (16, 24) -> 2 * 24       = 144
    #   layer 1 MoE: router (4, 16) -> 1 * 16; gate_up (4, 32, 16) -> 1 * 32 * 16;
    #                down (4, 16, 16) -> 1 * 16 * 16                                  = 784
    # (a formula N * bytes / 8 would undercount: 100 rows are padded to 104)
    per_layer = 4 + 32 + 16 + 16 + 32
    rank0 = 208 + 208 + 2 + 2 * per_layer + 144 + 784
    assert rank0 == 1546
    n_tensors = 1 + 1 + 1 + 2 * 6 + 3 + 3  # embed, lm_head, final norm, 2 norms + q k v o per layer, SwiGLU, MoE
    code = ("import json, torch; torch.set_num_threads(1)\n"
            "from memory import sharded_state_bytes; from model import MoEConfig\n"
            f"cfg = MoEConfig(**{TOY!r})\n"
            "print(json.dumps({o: sharded_state_bytes(cfg, o, world=8) for o in ('fp32', 'bf16_sr')}))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    # fp32: fp32 params and grads; AdamW's m, v in fp32 and a 4-byte fp32 `step` per tensor
    assert got["fp32"]["params"] == 4 * rank0
    assert got["fp32"]["grads"] == 4 * rank0
    assert got["fp32"]["optim"] == 8 * rank0 + 4 * n_tensors
    # bf16_sr: bf16 params and grads; AdamWBF16 keeps m, v in fp32 (its step count is an int)
    assert got["bf16_sr"]["params"] == 2 * rank0
    assert got["bf16_sr"]["grads"] == 2 * rank0
    assert got["bf16_sr"]["optim"] == 8 * rank0
    assert got["fp32"]["n_params"] == got["bf16_sr"]["n_params"] == 1600 + 1600 + 16 + 2 * 800 + 1152 + 3136


def test_live_bytes_counts_new_storages_not_views_or_old_tensors():
    old = torch.zeros(1000)
    with LiveBytes() as mem:
        a = torch.empty(1000, dtype=torch.float32)  # +4000
        v = a.view(10, 100).t()  # a view: +0
        old.add_(1)  # in place on an old tensor: +0
        b = (v * 2).to(torch.bfloat16)  # fp32 temporary (4000) freed, bf16 result +2000
        peak_so_far = mem.peak
        del a, v
        live = mem.live
    assert peak_so_far == 4000 + 4000 + 2000
    assert live == 2000 and b.numel() == 1000


def test_checkpointed_block_keeps_only_its_outputs_and_fake_equals_real():
    # With activation checkpointing a block's forward leaves only its outputs alive: the new
    # hidden state (T, H) and the router logits (T, E), both bf16. By hand: T=32, H=16, E=4.
    cfg = MoEConfig(**{**TOY, "mlp_only_layers": []})
    T = 32
    real = block_activation_bytes(cfg, T, ckpt=True, real=True)
    assert real["resident"] == 2 * T * 16 + 2 * T * 4
    fake = block_activation_bytes(cfg, T, ckpt=True, real=False)
    assert fake == real
    # without checkpointing more is kept, and the same amount on fake tensors as for real
    real_off = block_activation_bytes(cfg, T, ckpt=False, real=True)
    assert real_off == block_activation_bytes(cfg, T, ckpt=False, real=False)
    assert real_off["resident"] > 10 * real["resident"]
    # the block's unsharded bf16 parameter gradients: 2 bytes per parameter
    assert real["param_grads"] == 2 * real["params"]
