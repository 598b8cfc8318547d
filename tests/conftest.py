import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py
torch.set_num_threads(1)  # float64 depthwise convs run far slower multi-threaded here; tests measure no speed
