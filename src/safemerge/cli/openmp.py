"""OpenMP's wait policy for the command line, set before torch loads its OpenMP runtime (which reads it
once, at load): PASSIVE unless the user set one.

With the default policy an OpenMP thread spins while it waits for work; when another process holds
one of the cores, the torch threads then take turns with it, and 2 threads ran a training step 2.1x and
a short generation 5.6x slower than 1 thread (SmolLM2-135M, bfloat16). Waiting passively, 2 threads on
that machine ran as fast as 1 thread; idle they lost ~5% (training) to ~15% (generation) against
spinning (benchmarks/bench_threads.py, docs/benchmarks.md "Threads"). That is what lets the organism
keep one fixed thread count, and with it the same results, whatever the machine's load. Python users
set `OMP_WAIT_POLICY` themselves before importing torch.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
