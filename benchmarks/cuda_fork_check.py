"""Not a speed test: why the step server (saecomp/step_server.py) asks whether CUDA is available through NVML.

A process that asked `torch.cuda.is_available()` the default way and then forks: can the child use CUDA? And the
same with PyTorch's NVML-based check (``PYTORCH_NVML_BASED_CUDA_CHECK=1``), the switch the server sets while it
imports the libraries (SAEBench's absorption asks when imported). Each case runs in a fresh interpreter.

    python benchmarks/cuda_fork_check.py [--json out.json]      # on a machine with a CUDA device
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CASE = """
import os, sys, torch
available = torch.cuda.is_available()
pid = os.fork()
if pid == 0:
    try:
        value = torch.ones(4, device="cuda").sum().item()
        print(f"child: CUDA works ({value})", flush=True)
        os._exit(0)
    except Exception as error:
        print(f"child: {type(error).__name__}: {str(error).splitlines()[0]}", flush=True)
        os._exit(1)
_, status = os.waitpid(pid, 0)
print(f"parent: is_available={available} initialised={torch.cuda.is_initialized()} child_exit={os.waitstatus_to_exitcode(status)}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {}
    for name, nvml in (("default check", None), ("NVML-based check", "1")):
        env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
        if nvml:
            env["PYTORCH_NVML_BASED_CUDA_CHECK"] = nvml
        done = subprocess.run([sys.executable, "-c", CASE], env=env, capture_output=True, text=True, timeout=300)
        lines = (done.stdout + done.stderr).strip().splitlines()
        results[name] = {"child_can_use_cuda": "child: CUDA works" in done.stdout, "output": lines[-4:]}
        print(f"{name}: the forked child {'can' if results[name]['child_can_use_cuda'] else 'cannot'} use CUDA")
        for line in lines[-4:]:
            print(f"    {line}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
