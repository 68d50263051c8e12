import os
import sys

import torch

# Small tensors dominate the unit suite: one intra-op thread avoids oversubscribing a 2-core machine.
torch.set_num_threads(1)
os.environ.setdefault("DDPM_PROGRESS", "0")
sys.path.insert(0, os.path.dirname(__file__))  # for `from oracles import ...`
