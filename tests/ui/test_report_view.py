"""The Report section's handlers on a real report: the text under "The numbers behind it" is core.report.outline,
the same lines `python -m core report` prints, and a run whose end is worse than a kept checkpoint offers
"Report at checkpoint N" and "Export checkpoint N", the latter opening the export panel on that checkpoint."""

import html

import gradio as gr
import pytest

from core import events as ev
from core import report
from core.chat import ChatSession
from tests.helpers.runs import make_run
from ui import export_panel, report_view

pytestmark = pytest.mark.integration  # a whole report (40 neutral prompts): tens of seconds


def test_the_section_shows_the_cli_lines_and_offers_the_better_checkpoint(garage_home, tiny_model_dir, capsys):
    from core.__main__ import main

    run = make_run(garage_home, tiny_model_dir, checkpoints={3: True, 6: True},
                   data={"source": "builtin:demo-identity"})
    log = ev.EventLog(run)
    for step, loss in ((3, 0.9), (6, 1.3)):  # the end (step 6) is worse than checkpoint 3
        log.eval(step, loss)
    log.close()
    session = ChatSession(device="cpu")
    rep = report.make("r1", session=session)
    assert rep["health"]["overfitting"]["better_checkpoint"] == 3
    assert "checkpoint 3 has the best eval loss" in rep["verdict"]["text"]

    assert main(["report", "r1"]) == 0   # the saved report, printed
    printed = capsys.readouterr().out
    assert printed == "\n".join(report.outline(rep)) + "\n"
    assert "python -m core export r1 --checkpoint 3" in printed

    shown = report_view.render(rep)
    assert shown["best"] == 3 and html.escape(report.outline(rep)[2]) in shown["details"]  # the verdict line
    assert shown["details"].startswith("<pre class='lg-report-text'>")
    with gr.Blocks():
        view = report_view.build()
    updates = report_view.show(view, {"visible": True, **shown})
    assert updates[view.best_btn]["value"] == "Report at checkpoint 3 (best eval loss)"
    assert updates[view.export_btn]["value"] == "Export checkpoint 3" and updates[view.export_btn]["visible"]

    opened = export_panel.opened_on("r1", "checkpoint 3")
    assert opened["adapter"]["value"] == "checkpoint 3"
    assert opened["adapter"]["choices"] == ["final adapter", "checkpoint 3", "checkpoint 6"]
    assert opened["folder"].endswith("r1-checkpoint-3-gguf")
    # the panel's pick reaches core.export.source as the CLI's --checkpoint does: a missing one is named
    with pytest.raises(gr.Error, match="no complete checkpoint-7"):
        list(export_panel.export("r1", "checkpoint 7", str(garage_home / "out"), ["q8_0"], False))

    step3 = report.make("r1", 3, session=session)
    assert report_view.render(step3)["best"] is None   # a checkpoint's own report points nowhere else
    assert not any("--checkpoint 3" in line for line in report.outline(step3))
