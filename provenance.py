"""
Where a number was made: every results file the project writes carries platform_info(), so a value can
be traced to the code, the torch build and the hardware that produced it (numbers of a CPU run differ in
the last digits between machines and thread counts; see README, "Measured results").
"""
import os
import platform
import subprocess

import torch


def git_commit():
    """The checkout's commit, "+dirty" if tracked files differ from it; "" outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("+dirty" if sha and dirty else "")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def platform_info(device=None):
    """-> a JSON-able dict: torch version and build, device model, threads, CPU, Python, git commit."""
    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                cpu=cpu_model(), threads=torch.get_num_threads(), device=device, commit=git_commit())
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
