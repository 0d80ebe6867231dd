"""Runs the npm `e2b` SDK's suite (sdk.test.mjs, node's test runner) against the
same daemon, when E2B_JS_SDK names the node_modules directory holding it."""

import os
import pathlib
import subprocess

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.skipif(not os.environ.get("E2B_JS_SDK"), reason="E2B_JS_SDK (node_modules with the npm e2b SDK) is not set")
def test_the_js_sdk_suite_passes(daemon):
    env = dict(os.environ, NODE_PATH=os.environ["E2B_JS_SDK"], E2B_OTHER_KEY=daemon.other_key)
    run = subprocess.run(["node", "--test", "--test-reporter=spec", str(HERE / "sdk.test.mjs")],
                         env=env, capture_output=True, text=True, timeout=300)
    print(run.stdout[-6000:], run.stderr[-3000:])
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
