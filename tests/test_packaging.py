"""The installed package: ``lorasc_fast.kernels`` exists, a top-level ``kernels`` does not."""
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import importlib.util, json
    spec = importlib.util.find_spec("lorasc_fast")
    out = {"lorasc_fast": spec is not None, "kernels": importlib.util.find_spec("kernels") is not None}
    if spec is not None:
        import lorasc_fast.kernels.merge
        out["kernels_init_empty"] = not [n for n in vars(__import__("lorasc_fast.kernels").kernels)
                                         if not n.startswith("__") and n not in ("merge", "common")]
    import transformers
    from transformers import AutoConfig
    out["transformers"] = transformers.__version__
    print(json.dumps(out))
""")


def test_installed_layout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    import json
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["kernels"] is False, "a top-level 'kernels' module is importable"
    if not out["lorasc_fast"]:
        pytest.skip("lorasc-fast is not installed here (pip install .); CI installs it")
    assert out["kernels_init_empty"], "lorasc_fast.kernels' __init__ imports modules"
