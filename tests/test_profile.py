"""`profile_steps` writes a jax.profiler trace where TensorBoard's profile tab looks, and the
training log carries `data_wait` (the share of the time spent waiting for input)."""

import glob
import os

import pytest
from test_cli_errors import assert_one_line_error, train_cli
from test_train import DEMO, read_metrics, smoke

from clip_jax import config as config_lib
from clip_jax import train as train_lib


def test_smoke_run_with_profile_steps_writes_a_trace_and_logs_data_wait(
    demo_data_dir, tmp_path, capsys
):
    c = smoke(DEMO, demo_data_dir, total_steps=2, profile_steps="2,1")
    train_lib.train(c, str(tmp_path))
    traces = glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    rows = read_metrics(str(tmp_path))
    assert sorted(rows) == [1, 2]
    assert all(0 <= row["data_wait"] <= 1 for row in rows.values())
    out = capsys.readouterr().out
    assert "profile of steps 2-2 written to" in out
    assert out.count("data_wait=") == 2


@pytest.mark.parametrize(
    "value, words",
    [
        ("5", ["START,COUNT"]),
        ("a,b", ["START,COUNT"]),
        ("1,2,3", ["START,COUNT"]),
        ("0,3", [">= 1"]),
        ("2,0", [">= 1"]),
        ("9,1", ["total_steps=4"]),
    ],
)
def test_bad_profile_steps_are_rejected_with_the_fix(value, words):
    c = config_lib.smoke_variant(config_lib.defaults())
    c.profile_steps = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(c)
    assert "profile_steps" in str(e.value) and "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_bad_profile_steps_on_the_command_line_is_one_line_before_compiling(
    demo_data_dir, tmp_path
):
    done = train_cli(tmp_path, demo_data_dir, "--config.profile_steps=10")
    assert_one_line_error(done, "profile_steps", "'10'", "START,COUNT", workdir=str(tmp_path))
