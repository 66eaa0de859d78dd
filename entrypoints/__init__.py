"""The MLflow entry points. Inside a pipeline, ``python -m entrypoints.<step>`` hands its step to the pipeline's
step server, which has the libraries imported already (saecomp/step_server.py); anywhere else it runs as usual."""

import os as _os
import sys as _sys

if _os.environ.get("SAECOMP_STEP_SERVER") and _sys.argv[:1] == ["-m"]:  # only while `python -m` starts a step
    from saecomp.step_server import hand_over

    hand_over()  # exits with the step's status, or returns when no server can take the step
