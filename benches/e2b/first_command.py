"""Times Sandbox.create() then the first commands.run("true") through the
official e2b SDK, RUNS times, and prints the durations in seconds as JSON.
E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY point it at sandboxd; each
sandbox is killed (untimed) and the pool given PAUSE seconds to refill."""

import json
import os
import sys
import time

from e2b import Sandbox

runs, pause = int(sys.argv[1]), float(sys.argv[2])
Sandbox.create().kill()  # warms the SDK's connection pool and imports
samples = []
for _ in range(runs):
    started = time.perf_counter()
    sandbox = Sandbox.create()
    sandbox.commands.run("true")
    samples.append(time.perf_counter() - started)
    sandbox.kill()
    time.sleep(pause)
json.dump(samples, sys.stdout)
