"""OpenMP's wait policy for the command line, set before torch loads its OpenMP runtime (which reads it
once, at load): PASSIVE unless the user set one.

With the default (active) policy, an OpenMP thread spins while it waits for work; when another process
holds one of the cores, the torch threads then take turns with it and a 2-thread run of the organism
measured 2.3x (a training step) to 8x (generation) slower than 1 thread. Waiting passively, 2 threads on
such a machine ran as fast as 1 thread, and on an idle machine within a few percent of the default
(docs/organism.md, "Threads"). That is what lets the organism keep one fixed thread count, and with it
the same results, whatever the machine's load. Python users set `OMP_WAIT_POLICY` themselves before
importing torch.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
