# One intra-op thread for the tests: the suite is many tiny ops, where a second thread only adds
# synchronisation (on a loaded 2-core machine, up to 1000x slower per op was measured).
import torch

torch.set_num_threads(1)
