"""examples/plain_pytorch.py (the README example) runs and learns."""
import pathlib
import re
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "plain_pytorch.py"


def test_plain_pytorch_example_trains():
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                         timeout=300, check=True).stdout
    rewards = [float(x) for x in re.findall(r"reward ([0-9.]+)", out)]
    assert len(rewards) == 4, out
    assert rewards[-1] > rewards[0] + 0.3, out  # the policy learned to emit token 3
