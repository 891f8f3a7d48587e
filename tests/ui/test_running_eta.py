"""The ETA line while a run trains (the Train page's 1 s timer) reads events.jsonl on from where it stopped, through
the run's shared feed (ui.run_view.feed), and shows the same figure as a reading of the whole file."""

from core import config as C
from core import events as ev
from core.estimate import eta
from core.runs import folder as runs
from ui import run_view, train_tab


def _metrics(log, step, total=10):
    log.metrics(step=step, epoch=0.1, loss=1.0, lr=1e-4, grad_norm=1.0, tokens_per_s=100.0 * step, elapsed=step * 60.0,
                eta_s=(total - step) * 60.0, mem={})


def test_the_running_eta_reads_only_what_was_appended(monkeypatch):
    run_dir = runs.create(C.RunConfig())
    runs.update_status(run_dir, None, state="running", step=2, total_steps=10)
    status = runs.read_status(run_dir, reconcile=False)
    monkeypatch.setattr(runs, "read_status", lambda d, reconcile=True: status)  # no process behind this run
    monkeypatch.setattr("core.estimate.eta.time.time", lambda: 10**10)
    monkeypatch.setattr(run_view, "FEED_S", 0.0)  # every call reads on
    reads, real_read = [], ev.read

    def read(run_dir, offset=0):
        new, end = real_read(run_dir, offset)
        reads.append((offset, end))
        return new, end

    monkeypatch.setattr(ev, "read", read)
    log = ev.EventLog(run_dir)
    for step in (1, 2):
        _metrics(log, step)
    size = (run_dir / ev.FILE).stat().st_size
    line = train_tab.running_eta_md(run_dir.name)
    assert reads == [(0, size)] and "ETA" in line
    for step in (3, 4):
        _metrics(log, step)
    log.resume(3)  # a resume at step 3: step 4 logged before it is superseded
    _metrics(log, 4)
    log.close()
    reads.clear()
    line = train_tab.running_eta_md(run_dir.name)
    grown = (run_dir / ev.FILE).stat().st_size
    assert reads == [(size, grown)]  # only the appended bytes
    whole = eta.for_run(status, real_read(run_dir)[0])  # the whole file at once, as before
    assert line == f"**ETA** of run {run_dir.name}: {whole.text()}" and "last 4 steps" in line
    reads.clear()
    line_again = train_tab.running_eta_md(run_dir.name)
    assert reads == [(grown, grown)] and line_again == line


def test_the_eta_line_and_the_run_view_share_one_read_within_the_feed_interval(monkeypatch):
    run_dir = runs.create(C.RunConfig())
    runs.update_status(run_dir, None, state="running", step=2, total_steps=10)
    status = runs.read_status(run_dir, reconcile=False)
    monkeypatch.setattr(runs, "read_status", lambda d, reconcile=True: status)
    monkeypatch.setattr(run_view, "FEED_S", 60.0)
    log = ev.EventLog(run_dir)
    for step in (1, 2):
        _metrics(log, step)
    reads, real_read = [], ev.read
    monkeypatch.setattr(ev, "read", lambda d, offset=0: reads.append(offset) or real_read(d, offset))
    view = run_view.refresh(run_dir.name, {})
    line = train_tab.running_eta_md(run_dir.name)
    assert len(reads) == 1  # twenty pages ticking: one read of the file, one build of the charts
    assert "step 2 / 10" in view["progress"] and "ETA" in line
