"""Property: any task list, init and stage choice either builds a model that matches the
reference bit for bit, or is refused with exit 2 and one `Error:` line; never anything else."""

import string

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import crossstitch
from crossstitch import check_parity
from crossstitch.cli.app import app
from crossstitch.cli.argv import split_commas

NAMES = st.one_of(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,5}", fullmatch=True),
    st.text(alphabet=string.ascii_letters + string.digits + "_-. ", min_size=0, max_size=6),
)
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, 1.0, 0.9, -1.0, 1e30]),
)
STAGES = st.lists(
    st.sampled_from(["layer1", "layer2", "layer3", "layer4", "all", "block1", "layer5"]),
    max_size=3,
)


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    tasks=st.lists(NAMES, min_size=0, max_size=4),
    alpha=NUMBERS,
    beta=st.one_of(st.none(), NUMBERS),
    stages=STAGES,
    granularity=st.sampled_from(["channel", "layer", "pixel"]),
)
def test_build_succeeds_with_parity_or_fails_cleanly(
    tmp_path, tasks, alpha, beta, stages, granularity
):
    output = tmp_path / "m.pt"
    output.unlink(missing_ok=True)
    args = ["build", "resnet18", "--input-size", "32", "-o", str(output), "--json"]
    args += [f"--tasks={','.join(tasks)}", f"--alpha={alpha!r}", f"--granularity={granularity}"]
    if beta is not None:
        args.append(f"--beta={beta!r}")
    if stages:
        args.append(f"--stages={','.join(stages)}")
    result = CliRunner().invoke(app, args)
    if result.exit_code == 0:
        model = crossstitch.load(output)
        assert model.tasks == split_commas([",".join(tasks)])
        assert all(r.identical for r in check_parity(model, torch.randn(2, 3, 32, 32)))
    else:
        assert result.exit_code == 2, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert lines and lines[0].startswith("Error: ") and len(lines) <= 2, result.stderr
        assert "Traceback" not in result.stderr
        assert not output.exists()
