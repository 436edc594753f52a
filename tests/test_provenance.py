import json
import math

import torch

from model import context_problem, sampling_problems
from provenance import platform_info


def test_platform_info_is_json_and_names_torch_threads_commit():
    info = json.loads(json.dumps(platform_info()))
    assert info["torch"] == torch.__version__
    assert info["threads"] == torch.get_num_threads()
    assert len(info["commit"].split("+")[0]) in (0, 40)
    assert info["device"] in ("cpu", "cuda")


def test_sampling_problems_names_each_bad_flag():
    assert sampling_problems(0.0, 1.0, 8) == []
    assert sampling_problems(0.7, 0.5) == []
    bad = sampling_problems(-1, 0, 0, names=("--temperature", "--top-p", "--max-new-tokens"))
    assert [b.split("=")[0] for b in bad] == ["--temperature", "--top-p", "--max-new-tokens"]
    for t in (math.nan, math.inf, -0.1, True, "0.1"):
        assert len(sampling_problems(t, 1.0)) == 1, t
    for p in (math.nan, 2.0, 0.0, -1.0, math.inf):
        assert len(sampling_problems(0.0, p)) == 1, p
    assert len(sampling_problems(0.0, 1.0, 1.5)) == 1


def test_context_problem_bounds():
    assert context_problem(10, 22, 32) is None
    assert "at most 22 new tokens" in context_problem(10, 23, 32)
    assert "nothing can be generated" in context_problem(32, 1, 32)
