"""One rank of a torchrun job for tests/test_distributed.py: run a script's main() and save every module it
returns (policy, critic) to <out>/rank<r>.safetensors, so the test can compare the ranks' parameters.

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py <module> '<json Args fields>' <out>
"""

import importlib
import json
import os
import sys
from dataclasses import replace

import torch
from safetensors.torch import save_file

module_name, fields, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
module = importlib.import_module(module_name)
args = replace(module.Args(), **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
result = module.main(args)
modules = [r for r in result if isinstance(r, torch.nn.Module)]
tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, m in enumerate(modules) for k, v in m.state_dict().items()}
save_file(tensors, os.path.join(out, f"rank{os.environ['RANK']}.safetensors"))
