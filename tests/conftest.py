# One intra-op thread for the tests: the suite is many tiny ops, where a second thread only adds
# synchronisation (on a loaded 2-core machine, up to 1000x slower per op was measured).
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

TOY_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "udhr" / "bpe.tiktoken"


@pytest.fixture(scope="session")
def tok():
    """The bundled toy BPE with its chat format (read-only: shared by every test that asks for it)."""
    from tokenizer import load_tokenizer
    return load_tokenizer(TOY_TOKENIZER)
