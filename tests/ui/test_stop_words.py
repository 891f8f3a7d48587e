"""The Train and Runs pages say what the Stop did, from status.json and the checkpoints on disk."""

from core import config as C
from core.runs import folder as runs
from core.runs import stopping
from ui import run_view, runs_tab


def _stopped(error=None, checkpoint: int | None = None):
    run_dir = runs.create(C.RunConfig())
    runs.write_status(run_dir, state="stopped", step=7, total_steps=40, error=error)
    if checkpoint:
        ck = runs.checkpoints_dir(run_dir) / f"checkpoint-{checkpoint}"
        ck.mkdir(parents=True)
        (ck / runs.COMPLETE).write_text("")
    return run_dir, runs.read_status(run_dir)


def test_a_kill_is_red_and_never_called_saved():
    run_dir, _ = _stopped()
    runs.write_status(run_dir, error=stopping.killed_error(run_dir, 30.0, 7))
    st = runs.read_status(run_dir)
    for text in (run_view.status_md(run_dir.name, st), runs_tab.open_run(run_dir.name)[0]):
        assert "lg-badge-bad" in text and "killed" in text and "class='lg-bad'" in text
        assert "saved" not in text.replace("no checkpoint was saved", "")
        assert "resume" not in text.lower()


def test_a_clean_stop_names_the_checkpoint_it_wrote():
    run_dir, st = _stopped(checkpoint=7)
    text = run_view.status_md(run_dir.name, st)
    assert "Stopped and saved: checkpoint-7 (step 7). Resume continues from checkpoint-7." in text
    assert "class='lg-bad'" not in text


def test_a_stop_before_any_checkpoint_says_nothing_was_saved():
    run_dir, st = _stopped()
    text = run_view.status_md(run_dir.name, st)
    assert "nothing was saved" in text and "Stopped and saved" not in text


def test_while_stopping_the_page_counts_down_the_step():
    run_dir = runs.create(C.RunConfig())
    runs.write_status(run_dir, state="stopping", **{stopping.STOP_REQUESTED_AT: 1e12, stopping.STEP_S: 40.0,
                                                    stopping.STOP_GRACE_S: 120.0})
    text = run_view.status_md(run_dir.name, runs.read_status(run_dir))
    assert "Stopping after the current step" in text and "it is killed" in text


def test_before_the_first_step_the_page_names_the_start_up_phase_k_of_n():
    from core.train import child  # heavy

    run_dir = runs.create(C.RunConfig())
    runs.write_status(run_dir, state="running", step=0)
    child._rows_progress(run_dir)(120, 480)
    text = run_view.status_md(run_dir.name, runs.read_status(run_dir))
    assert "Starting, 2 of 4: tokenising the data (row 120 of 480)" in text
    child.startup_phase(run_dir, 4)
    assert "4 of 4: the first step" in run_view.status_md(run_dir.name, runs.read_status(run_dir))


def test_the_runs_table_names_the_objective():
    cfg = C.RunConfig()
    cfg.train.objective = "dpo"
    runs.create(cfg)
    row = runs_tab.table().iloc[0]
    assert row["method"] == "lora" and row["objective"] == "dpo"
