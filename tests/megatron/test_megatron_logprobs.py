"""The fused log-prob path (no entropy gradient) equals the all-in-graph path and a plain log_softmax, at TP1 and
TP2, in value and in gradient (including the padded vocabulary rows, whose gradient must be 0); the chunked path
equals the unchunked one, with and without the entropy's gradient."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from megatron_testlib import free_port  # noqa: E402

WORKER = Path(__file__).with_name("logprobs_worker.py")


@pytest.mark.parametrize("world", [1, 2])
def test_fused_logprobs_match_graph_and_reference(tmp_path, world):
    out, port = tmp_path / "out.pt", free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out)], env=env, stderr=subprocess.PIPE))
    for proc in procs:
        assert proc.wait(timeout=180) == 0, proc.stderr.read().decode()[-3000:]
    result = torch.load(out)
    fused, graph, reference = result["fused"], result["graph"], result["reference"]
    for key in ("logprobs", "entropy"):
        torch.testing.assert_close(fused[key], reference[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(graph[key], reference[key], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused["grad"], graph["grad"], atol=1e-6, rtol=1e-5)
    assert fused["grad"][..., 50:].abs().max() == 0
    for chunked, whole in (("chunked", "fused"), ("chunked_entropy", "graph_entropy")):
        for key in ("logprobs", "entropy", "grad"):
            diff = (result[chunked][key] - result[whole][key]).abs().max().item()
            assert diff <= 1e-6, f"world {world}: {chunked} {key} differs from {whole} by {diff}"
    assert result["chunked_entropy"]["grad"][..., 50:].abs().max() == 0
    # the entropy's gradient is really there: it moves the logits' gradient away from the log-prob-only one
    assert (result["chunked_entropy"]["grad"] - result["chunked"]["grad"]).abs().max() > 1e-3
