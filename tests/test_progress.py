"""tuneforge.progress: piped output prints a start line, periodic lines and an end line; never silent."""

from tuneforge import progress


def test_piped_phase_prints_start_periodic_and_end_lines(monkeypatch):
    lines: list[str] = []
    clock = iter([0.0, 0.0, 5.0, 11.0, 25.0, 30.0])  # monotonic(): start, each advance, end
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with progress.phase("merge", total=4, log=lines.append, every=10, tty=False) as p:
        for _ in range(4):
            p.advance()
    assert lines[0] == "merge: started (4 to do)"
    # Two advances crossed a 10 s boundary (the 3rd at 11 s, the 4th at 25 s): one line each, with counts and an estimate.
    assert lines[1] == "merge: 3/4 (75%), 11 s, ~4 s left"
    assert lines[2].startswith("merge: 4/4 (100%), 25 s")  # the advance at 5 s printed nothing
    assert lines[-1] == "merge: done, 4/4 in 30 s"
    assert len(lines) == 4


def test_unknown_total_counts_only():
    lines: list[str] = []
    with progress.phase("prepare", log=lines.append, every=0, tty=False) as p:
        p.advance(3)
    assert lines[0] == "prepare: started"
    assert lines[1].startswith("prepare: 3 done")
    assert lines[-1].startswith("prepare: done, 3 in")
