from bench.rehearsal.measure import StageResult, format_table, last_error_line, steady_rate


def test_last_error_line_names_the_rank_that_died_first(tmp_path):
    log = tmp_path / "stage.log"
    log.write_text(
        "Epoch 0: 100%\r  6/6\n"
        "[rank1]: Traceback (most recent call last):\n"
        "[rank1]: AttributeError: 'str' object has no attribute 'items'\n"
        "/x.py:3: UserWarning: a DeprecationWarning-ish Error word\n"
        "[rank0]: RuntimeError: Connection closed by peer\n"
    )
    assert last_error_line(log) == (
        "[rank1]: AttributeError: 'str' object has no attribute 'items' (then: [rank0]: RuntimeError: Connection "
        "closed by peer)"
    )


def test_last_error_line_of_a_one_line_cli_error(tmp_path):
    log = tmp_path / "stage.log"
    log.write_text("loading\nseed-lightning: error: data.batch_size must be >= 1, got 0\n")
    assert last_error_line(log) == "seed-lightning: error: data.batch_size must be >= 1, got 0"


def test_steady_rate_skips_the_warm_up_steps():
    # Steps 1-2 are slow (compilation); then one step per second.
    events = [(1, 100.0, 0.0), (2, 160.0, 0.0)] + [(step, 160.0 + step - 2, 0.0) for step in range(3, 11)]
    rate, steps = steady_rate(events, samples_per_step=64)
    assert steps == 8 and rate == 64.0
    assert steady_rate(events[:3], samples_per_step=64) is None


def test_table_has_one_row_per_stage_and_escapes_pipes():
    table = format_table([
        StageResult("a", "stage a", status="completed", exit_code=0, wall_s=12.4, throughput="5 img/s"),
        StageResult("b", "stage b", error="needs x | y (from a)"),
    ])
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[2] == "| stage a | completed | 0 | 12 | 5 img/s |  |  |"
    assert lines[3] == "| stage b | skipped |  |  |  |  | needs x \\| y (from a) |"
