"""metrics.jsonl: rows written by rank 0 only, read back by programs
(hybrid_fc.training.metrics)."""
import json

import pytest

from hybrid_fc.training.metrics import MetricsLog, read_metrics


def test_rows_round_trip_resume_duplicates_and_partial_line(tmp_path):
    printed = []
    log = MetricsLog(str(tmp_path), rank=0, print_fn=printed.append)
    log.record("train", step=2, loss=3.0)
    log.record("train", step=4, loss=2.5)
    log.record("verify", step=4, set="lfw", accuracy=0.9)
    log.log("step 4 ...")
    log.close()
    # a resumed run repeats step 4 (after a checkpoint at 2) and goes on
    log = MetricsLog(str(tmp_path), rank=0, print_fn=printed.append)
    log.record("train", step=4, loss=2.4)
    log.record("train", step=6, loss=2.0)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 8, "lo')           # a writer killed mid-line
    rows = read_metrics(str(tmp_path), "train")
    assert [(r["step"], r["loss"]) for r in rows] == [(2, 3.0), (4, 2.4), (6, 2.0)]
    assert len(read_metrics(str(tmp_path / "metrics.jsonl"), "train", last=False)) == 4
    assert read_metrics(str(tmp_path), "verify")[0]["accuracy"] == 0.9
    assert all("time" in r for r in rows)
    assert printed == ["step 4 ..."] and (tmp_path / "training.log").read_text() == "step 4 ...\n"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "train"


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLog(str(tmp_path / "r1"), rank=1, print_fn=lambda s: None)
    log.record("train", step=1, loss=1.0)
    log.log("x")
    log.close()
    assert not (tmp_path / "r1").exists()


def test_an_unwritable_run_folder_is_named(tmp_path):
    """Bug caught: a run folder whose metrics.jsonl cannot be written (here a folder is in the
    way; read-only folders and full disks fail the same call) gave a bare traceback."""
    from hybrid_fc.training.metrics import MetricsLog
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(OSError, match="cannot write the run's logs in .*train.output_dir must "
                                      "be a writable folder"):
        MetricsLog(str(tmp_path), 0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot write the run's logs in"):
        MetricsLog(str(tmp_path / "file" / "run"), 0)


def test_a_resumed_log_drops_the_undone_steps_only(tmp_path):
    """The rows and step lines of steps after the checkpoint go; starts, resume records, notes
    and errors of the interrupted run stay."""
    log = MetricsLog(str(tmp_path), 0, print_fn=lambda s: None)
    log.record("start", step=0)
    for step in (1, 2, 3):
        log.record("train", step=step, loss=1.0)
        log.log(f"step {step:>7d}/9  loss 1.0")
    log.record("verify", step=3, set="lfw", accuracy=0.5)
    log.log("verify [lfw] step 3: accuracy 50.00%")
    log.log("note: something")
    log.close()
    log = MetricsLog(str(tmp_path), 0, print_fn=lambda s: None, resumed_at=2)
    log.close()
    rows = read_metrics(str(tmp_path), last=False)
    assert [(r["kind"], r["step"]) for r in rows] == [("start", 0), ("train", 1), ("train", 2)]
    assert (tmp_path / "training.log").read_text().splitlines() == [
        "step       1/9  loss 1.0", "step       2/9  loss 1.0", "note: something"]


def test_plot_of_two_runs(tmp_path):
    """launch/plot.py: one panel per figure of the runs' metrics.jsonl, a line per run in each,
    a PNG that decodes."""
    import os
    import subprocess
    import sys
    from PIL import Image
    from hybrid_fc.training.metrics import plot_runs
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, slope in (("a", 1.0), ("b", 2.0)):
        log = MetricsLog(str(tmp_path / name), 0, print_fn=lambda s: None)
        for step in (1, 2, 3, 4):
            log.record("train", step=step, loss=10 - slope * step, img_s=100.0 * step,
                       lr=0.1 / step, backbone_lr=0.05 / step)
        for step in (2, 4):
            log.record("verify", step=step, set="lfw", accuracy=0.5 + 0.1 * step * slope)
        log.close()
    fig = plot_runs([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "x.png"))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "learning rate (head; backbone dashed)", "images / s",
                      "lfw accuracy %"]
    assert [len(ax.lines) for ax in fig.axes] == [2, 4, 2, 2]
    assert [line.get_label() for line in fig.axes[0].lines] == ["a", "b"]
    assert list(fig.axes[3].lines[1].get_ydata()) == [pytest.approx(90.0), pytest.approx(130.0)]
    r = subprocess.run([sys.executable, os.path.join(root, "launch", "plot.py"),
                        str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                        str(tmp_path / "runs.png")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "runs.png").size == (1680, 360)
    r = subprocess.run([sys.executable, os.path.join(root, "launch", "plot.py"),
                        str(tmp_path / "nothing"), "--out", str(tmp_path / "n.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no metrics.jsonl" in r.stderr and "Traceback" not in r.stderr
