"""The console when it is not a terminal (a log file, CI, `ray job logs`): bars as plain lines."""

import io
import json

from ray.experimental.tqdm_ray import tqdm as ray_tqdm

from pipeline.console import PlainBarLines, progress


def test_a_workers_bar_is_one_line_per_step_and_none_for_a_repeated_state():
    """The states a real tqdm_ray bar dumps on a worker's stdout, each shipped more than once
    (Ray forwards every flush): one line per count, the closing state adding none."""
    bar = ray_tqdm(total=3, desc="MID training", unit="epoch")
    out = io.StringIO()
    lines = PlainBarLines(out)
    for count in range(4):
        bar._x = count
        if count == 3:
            bar.set_description("MID training (loss 0.123)")
        for _ in range(3):
            lines.draw(json.dumps(bar._get_state()))
    bar._closed = True
    lines.draw(json.dumps(bar._get_state()))
    lines.draw("not a bar state")
    assert out.getvalue().splitlines() == ["  MID training: 0/3 epoch", "  MID training: 1/3 epoch",
                                           "  MID training: 2/3 epoch", "  MID training (loss 0.123): 3/3 epoch"]


def test_a_driver_bar_off_a_terminal_writes_whole_lines_without_carriage_returns(capsys):
    for _ in progress(range(1000), desc="pool shards", unit="shard"):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines and len(lines) <= 3 and lines[-1].startswith("pool shards: 100%") and "1000/1000" in lines[-1]
