"""Shard sets in S3, against a real S3 HTTP endpoint: moto's server, started by this module in a process of
its own (DALI's pipeline build holds the GIL while its AWS SDK waits for the endpoint, so a server thread
in this process would stall it). DALI reads the tars from it, boto3 the manifest and indexes; `train.py`
runs in this process where it can, under a real two-process `accelerate launch` where ranks matter.

The set: 64 samples of the 2k demo validation set in 4 tars (`make_shards.py --limit 64 --shard-size
100KB`), uploaded by `make_shards.py` itself: DALI fetches every sample's image and label with a request
of its own, so a run's reads cost requests, not bytes. The credentials are made up; the secret key is a marker
that no file a run writes, and nothing it prints, may contain.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from pipelines.shards import ShardError, open_shard_set, sample_labels
from test_faults import worker
from test_train import (DATA, ENV, ROOT, assert_ok, assert_one_line_error, checkpoints, losses, tail, train,
                        two_process_command)

BUCKET = "fastssl-test"
SECRET = "fastssl-test-secret-7c1f0e"  # must never appear in a run's files or output
SET_OPTIONS = ["--limit", "64", "--shard-size", "100KB", "--workers", "1"]
SMALL_RUN = ["--batch-size", "8", "--val-data", ""]

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------- the endpoint


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MotoServer:
    """`python -m moto.server` on a free port, its request log (moto's recorder) in `recording`; `stop`
    ends it, `start` starts an empty one on the same port."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.recording = folder / f"moto-{self.port}.jsonl"
        self.start()

    def start(self) -> None:
        env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(self.recording)}
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=1).close()
                return
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, "moto did not start"
                time.sleep(0.1)

    def api(self, path: str, body: str = "") -> None:
        request = urllib.request.Request(f"{self.url}/moto-api/{path}", data=body.encode(), method="POST",
                                         headers={"Content-Type": "text/plain"})  # not a form: moto reads the body
        urllib.request.urlopen(request, timeout=10).close()

    def requests(self, action):
        """(method, path) of every request `action()` sent, in order."""
        self.api("recorder/reset-recording")
        self.api("recorder/start-recording")
        try:
            action()
        finally:
            self.api("recorder/stop-recording")
        entries = [json.loads(line) for line in self.recording.read_text().splitlines() if line.strip()]
        return [(entry["method"], entry["url"].split("//", 1)[-1].split("/", 1)[-1]) for entry in entries]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


def aws_environment(endpoint: str, cache: Path) -> dict[str, str]:
    """The standard AWS variables for the test endpoint (no ~/.aws file of the machine is read), one
    attempt per request (a fault shows at once), and the fastssl cache in `cache`."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "fastssl-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(cache / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(cache / "no-aws-creds"),
            "AWS_MAX_ATTEMPTS": "1", "FASTSSL_CACHE": str(cache)}


def upload(prefix: str, *extra: str) -> None:
    """`make_shards.py DATA s3://BUCKET/prefix` with the test set's options, in this process."""
    from tools.make_shards import main as make_shards

    assert make_shards([DATA, f"s3://{BUCKET}/{prefix}", *SET_OPTIONS, *extra]) == 0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(server, environment, upload requests): the module's endpoint with the bucket and the set `small`
    in it, uploaded by make_shards.py, and the (method, path) of each request the upload sent; this
    process's environment points at the endpoint for the module (DALI's AWS client reads it once per
    process)."""
    folder = tmp_path_factory.mktemp("s3")
    server = MotoServer(folder)
    environment = aws_environment(server.url, folder / "cache")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        from pipelines.s3 import client

        client().create_bucket(Bucket=BUCKET)
        requests = server.requests(lambda: upload("small"))
        yield server, environment, requests
    server.stop()


@pytest.fixture(scope="module")
def local_copy(tmp_path_factory) -> Path:
    """The same set written locally (make_shards.py is deterministic)."""
    from tools.make_shards import main as make_shards

    out = tmp_path_factory.mktemp("local") / "small"
    assert make_shards([DATA, str(out), *SET_OPTIONS]) == 0
    return out


def objects(prefix: str) -> dict[str, bytes]:
    from pipelines.s3 import client

    s3 = client()
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", [])
    return {item["Key"].rsplit("/", 1)[1]: s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
            for item in listed}


def no_secret_in(folder: Path, *texts: str) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    for text in texts:
        assert SECRET not in text


# ---------------------------------------------------------------------------------------------- the set


def copy_set(source: str, prefix: str) -> None:
    """The objects of the set at `source` copied (in the store) to `prefix`: the same bytes and ETags."""
    from pipelines.s3 import client

    s3 = client()
    for name in objects(source):
        s3.copy_object(Bucket=BUCKET, Key=f"{prefix}/{name}", CopySource={"Bucket": BUCKET, "Key": f"{source}/{name}"})


def test_make_shards_uploads_the_set_a_local_build_writes_with_the_manifest_last(store, local_copy):
    _, _, requests = store
    written = [path.rsplit("/", 1)[1] for method, path in requests if method == "PUT" and "/small/" in path]
    assert written[-1] == "manifest.json" and sorted(written) == sorted(p.name for p in local_copy.iterdir())
    assert objects("small") == {path.name: path.read_bytes() for path in local_copy.iterdir()}
    assert not list((Path(os.environ["FASTSSL_CACHE"]) / "staging").iterdir())  # the local copy is gone

    from tools.make_shards import main as make_shards

    assert make_shards([DATA, f"s3://{BUCKET}/small", *SET_OPTIONS]) == 2  # not over a set without --force


def test_open_fetches_manifest_and_indexes_once_by_etag_and_sees_a_new_upload(store, local_copy):
    server, _, _ = store
    shards = open_shard_set(f"s3://{BUCKET}/small", need_labels=True)
    local = open_shard_set(str(local_copy))
    assert shards.root == f"s3://{BUCKET}/small" and shards.tars[0] == f"s3://{BUCKET}/small/small-000000.tar"
    assert (shards.num_samples, shards.counts, shards.classes) == (local.num_samples, local.counts, local.classes)
    for cached, index in zip(shards.indexes, local.indexes):
        assert cached.read_bytes() == index.read_bytes()
        assert cached.name == shards.etags[index.name]  # the cache file is named by the object's ETag
    assert (sample_labels(shards) == sample_labels(local)).all()  # one streamed pass over each tar

    again = server.requests(lambda: open_shard_set(f"s3://{BUCKET}/small"))
    assert [method for method, _ in again] == ["GET"] and "list-type=2" in again[0][1]  # a listing, no fetch

    manifest = json.loads((local_copy / "manifest.json").read_text())
    from pipelines.s3 import client

    client().put_object(Bucket=BUCKET, Key="small/manifest.json", Body=json.dumps({**manifest, "seed": 1}).encode())
    changed = open_shard_set(f"s3://{BUCKET}/small")
    assert changed.manifest["seed"] == 1 and changed.etags["manifest.json"] != shards.etags["manifest.json"]
    client().put_object(Bucket=BUCKET, Key="small/manifest.json", Body=(local_copy / "manifest.json").read_bytes())


def test_the_input_stack_reads_the_same_batches_from_s3_as_from_disk_and_resumes_mid_epoch(store, local_copy):
    from pipelines.spec import preset
    from pipelines.stack import InputStack

    recipe = preset("simclr").with_multicrop("2x32")
    stacks = [InputStack(recipe, data, 16, num_threads=1, seed=3, sample_indices=True)
              for data in (f"s3://{BUCKET}/small", str(local_copy))]
    for _ in range(2):
        remote, local = (next(stack) for stack in stacks)
        assert remote.keys == local.keys
        assert torch.equal(remote.indices, local.indices) and torch.equal(remote.labels, local.labels)
        assert all(torch.equal(a, b) for a, b in zip(remote.views, local.views))
    resumed = InputStack(recipe, f"s3://{BUCKET}/small", 16, num_threads=1, seed=3)
    resumed.load_state_dict(stacks[0].state_dict())  # DALI's reader state, restored over S3
    assert next(resumed).keys == next(stacks[0]).keys


@pytest.mark.parametrize("fault", ["no bucket", "no set", "refused credentials", "no endpoint"])
def test_store_faults_are_one_line_errors_naming_the_url_and_the_fix(store, fault, monkeypatch):
    server, _, _ = store
    url = {"no bucket": "s3://no-such-bucket/set", "no set": f"s3://{BUCKET}/nothing-here"}.get(fault,
                                                                                               f"s3://{BUCKET}/small")
    expected = {"no bucket": "bucket no-such-bucket does not exist", "no set": "no shard set at",
                "refused credentials": "refused the credentials", "no endpoint": "cannot reach"}[fault]
    if fault == "no endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    if fault == "refused credentials":
        server.api("reset-auth", "0")  # from now on moto checks access keys: ours is unknown to it
    try:
        with pytest.raises(ShardError) as raised:
            open_shard_set(url)
        if fault == "refused credentials":
            result = train("--data", url, *SMALL_RUN)
    finally:
        if fault == "refused credentials":
            server.api("reset-auth", "inf")
    message = str(raised.value)
    assert "\n" not in message and expected in message and url.split("/")[2] in message, message
    assert SECRET not in message
    if fault == "refused credentials":  # what a user sees: one line, exit 2
        assert_one_line_error(result, expected, "AWS_SECRET_ACCESS_KEY")
        assert SECRET not in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------- runs


def launch(environment: dict, *args) -> subprocess.Popen:
    return subprocess.Popen(two_process_command(*args), cwd=ROOT, env={**ENV, **environment}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(process: subprocess.Popen, run: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ((run / "checkpoints").is_dir() and any(name.startswith("step-") for name in checkpoints(run))):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.2)


def test_two_ranks_train_from_s3_stop_on_sigterm_resume_and_finish_without_writing_the_secret(store, tmp_path):
    _, environment, _ = store
    run = tmp_path / "run"
    args = ["--data", f"s3://{BUCKET}/small", *SMALL_RUN, "--checkpoint-every", 2, "--output-dir", tmp_path,
            "--name", "run"]
    launcher = launch(environment, *args, "--max-steps", 400)
    try:
        wait_for_checkpoint(launcher, run)
        worker(launcher, 1, time.monotonic() + 30).send_signal(signal.SIGTERM)
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, tail(stderr)
    stopped = max(losses(run))
    assert f"stop requested: checkpoint written at step {stopped}" in stdout

    resumed = subprocess.run(two_process_command(*args, "--max-steps", stopped + 2, "--resume", "auto"), cwd=ROOT,
                             env={**ENV, **environment}, capture_output=True, text=True, timeout=240)
    assert_ok(resumed)
    assert list(losses(run)) == list(range(1, stopped + 3))
    assert checkpoints(run)[-1] == f"step-{stopped + 2:08d}" and (run / "backbone.safetensors").is_file()
    config = (run / "config.yaml").read_text()
    assert f"data: s3://{BUCKET}/small" in config and f"s3_endpoint: {environment['AWS_ENDPOINT_URL']}" in config
    no_secret_in(run, stdout, stderr, resumed.stdout, resumed.stderr)


def checkpoint_files(run: Path) -> dict[str, bytes]:
    """The files of the run's complete checkpoints (not of one being written, under a temporary name)."""
    return {str(path.relative_to(run)): path.read_bytes() for folder in sorted((run / "checkpoints").glob("step-*"))
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_shard_deleted_mid_run_stops_both_ranks_with_one_error_and_keeps_the_checkpoints(store, tmp_path):
    _, environment, _ = store
    copy_set("small", "doomed")
    run = tmp_path / "run"
    launcher = launch(environment, "--data", f"s3://{BUCKET}/doomed", *SMALL_RUN, "--max-steps", 400,
                      "--checkpoint-every", 2, "--output-dir", tmp_path, "--name", "run")
    try:
        wait_for_checkpoint(launcher, run)
        from pipelines.s3 import client

        for name in objects("doomed"):
            if name.endswith(".tar"):
                client().delete_object(Bucket=BUCKET, Key=f"doomed/{name}")
        stdout, stderr = launcher.communicate(timeout=120)  # a rank left in a collective would hang here
    finally:
        if launcher.poll() is None:
            launcher.kill()
    errors = [line for line in stderr.splitlines() if line.startswith("train.py: error:")]
    assert launcher.returncode != 0 and len(errors) == 1, tail(stderr, 40)
    assert "is gone from the bucket" in errors[0] and "--resume auto continues from it" in errors[0], errors[0]
    failed_at = int(errors[0].split("at step ")[1].split(":")[0])
    last = checkpoints(run)[-1]
    assert int(last.removeprefix("step-")) < failed_at and not any(".tmp" in name for name in checkpoints(run))
    from safetensors.torch import load_file

    load_file(run / "checkpoints" / last / "model.safetensors")  # whole
    assert 'train.py", line' not in stderr  # no traceback of a rank (the launcher prints its own)


def test_an_endpoint_that_goes_away_is_a_one_line_error_and_keeps_the_checkpoints(store, local_copy, tmp_path):
    server, _, _ = store
    run = tmp_path / "run"
    before = {}

    def stop_the_endpoint_after_a_checkpoint():
        deadline = time.monotonic() + 120
        while not before and time.monotonic() < deadline:
            time.sleep(0.05)
            before.update(checkpoint_files(run) if (run / "checkpoints").is_dir() else {})
        server.stop()

    watcher = threading.Thread(target=stop_the_endpoint_after_a_checkpoint, daemon=True)
    watcher.start()
    try:
        result = train("--data", f"s3://{BUCKET}/small", *SMALL_RUN, "--max-steps", 400, "--checkpoint-every", 2,
                       "--keep-checkpoints", 400, "--output-dir", tmp_path, "--name", "run")
    finally:
        watcher.join(timeout=130)
        server.start()  # the same port, for the module's later tests: the bucket and the set again
        from pipelines.s3 import S3Prefix, client, upload_shard_set

        client().create_bucket(Bucket=BUCKET)
        upload_shard_set(local_copy, S3Prefix(BUCKET, "small"), sorted(p.name for p in local_copy.iterdir()), [])
    error = assert_one_line_error(result, f"cannot reach {server.url}", f"s3://{BUCKET}/small", alone=False)
    assert "--resume auto continues from it" in error
    assert before and {name: data for name, data in checkpoint_files(run).items() if name in before} == before
    no_secret_in(run, result.stdout, result.stderr)
