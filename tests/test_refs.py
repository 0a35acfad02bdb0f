"""Refs are hostile: whoever can create a run picks them. None may write outside its root, in milliseconds."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from prefect.deployments import run_deployment
from prefect.exceptions import PrefectHTTPStatusError
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import validate

from factory.errors import ConfigurationError, StorageError, StorageSpooled
from factory.models import MAX_INPUT_REFS
from factory.storage import Location, Storage
from flows.job import factory
from tests.helpers import job_params, run_job
from tests.test_params import deployment  # noqa: F401 - the fixture


class DownStore:
    """An S3 that refuses every write, as when the bucket is missing or the store is down."""

    async def write(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        raise StorageError(f"cannot write s3://{bucket}/{key}: NoSuchBucket")


class RecordingStore:
    def __init__(self) -> None:
        self.written: dict[str, bytes] = {}

    async def write(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        self.written[f"s3://{bucket}/{key}"] = data


@pytest.fixture
def storage(tmp_path) -> Storage:
    return Storage(tmp_path / "root", DownStore())


@pytest.fixture
def outside(tmp_path) -> Path:
    """A unique place outside the root that no ref may reach."""
    return tmp_path / f"outside-{uuid.uuid4().hex[:8]}"


BAD_S3 = [
    ("s3://no-such-bucket//tmp/x/", "starts with '/'"),
    ("s3://bucket-ok/../../../etc/x", "'..'"),
    ("s3://bucket-ok/a/../../b", "'..'"),
    ("s3://bucket-ok/a/..", "'..'"),
    ("s3://bucket-ok/a/./b", "'.'"),
    ("s3://bucket-ok/a//b", "empty segment"),
    ("s3://bucket-ok/a\x00b", "control character"),
    ("s3://bucket-ok/a\nb", "control character"),
    ("s3://bucket-ok/a\\..\\..\\b", "backslash"),
    ("s3://bucket-ok/\ud800", "UTF-8"),
    ("s3://bucket-ok/" + "k" * 1000, "bytes"),
    ("s3://bucket-ok/" + "é" * 500, "bytes"),
    ("s3://b/x", "bucket"),
    ("s3://Bucket-Upper/x", "bucket"),
    ("s3://bucket_under/x", "bucket"),
    ("s3://-bucket/x", "bucket"),
    ("s3://bucket-/x", "bucket"),
    ("s3://a..b/x", "bucket"),
    ("s3://" + "a" * 64 + "/x", "bucket"),
    ("s3://user@bucket/x", "bucket"),
]


@pytest.mark.fast
@pytest.mark.parametrize("ref, reason", BAD_S3, ids=[repr(r[:40]) for r, _ in BAD_S3])
@pytest.mark.parametrize("field", ["output_ref", "log_ref", "input_refs[3]"])
def test_bad_s3_refs_are_refused_naming_the_field(storage, ref, reason, field):
    with pytest.raises(ConfigurationError, match=f"^`{re.escape(field)}`") as caught:
        storage.resolve(ref, field)
    assert caught.value.field == field
    assert reason in str(caught.value)
    assert "\x00" not in str(caught.value), "the message shows control characters escaped"


GOOD_S3 = [
    ("s3://factory-test", "factory-test", ""),
    ("s3://factory-test/", "factory-test", ""),
    ("s3://factory-test/jobs/a/", "factory-test", "jobs/a/"),
    ("s3://my.bucket-1/a/b.md", "my.bucket-1", "a/b.md"),
    ("s3://abc/r\u00e9sum\u00e9 notes/.hidden", "abc", "r\u00e9sum\u00e9 notes/.hidden"),
    ("s3://abc/" + "k" * 960, "abc", "k" * 960),
]


@pytest.mark.fast
@pytest.mark.parametrize("ref, bucket, key", GOOD_S3, ids=[r[:30] for r, _, _ in GOOD_S3])
def test_good_s3_refs_resolve(storage, ref, bucket, key):
    location = storage.resolve(ref, "output_ref")
    assert (location.bucket, location.key) == (bucket, key)


@pytest.mark.fast
def test_the_longest_s3_key_leaves_room_for_what_a_job_adds(storage):
    location = storage.resolve("s3://abc/" + "k" * 956 + ".md", "output_ref")
    longest = location.sibling(f"{location.stem}-iterations").child("iteration-50.webp")
    assert len(longest.key.encode()) <= 1024


BAD_LOCAL = [
    ("out\x00put/", "control character"),
    ("notes\x1b[2J.txt", "control character"),
    ("file://evil-host/etc/x", "host"),
    ("file://localhost/etc/x", "host"),
    ("file:///tmp/a%2e%2e/x", "plain path"),
    ("..\\..\\etc\\x", "backslash"),
    ("C:/Users/x", "Windows"),
    ("/etc/factory-out", "outside the storage root"),
    ("../../escape/log.json", "outside the storage root"),
    (".spool/factory-test/jobs/log.json", "spool"),
    ("jobs/../.spool/x", "spool"),
]


@pytest.mark.fast
@pytest.mark.parametrize("ref, reason", BAD_LOCAL, ids=[repr(r) for r, _ in BAD_LOCAL])
def test_bad_local_refs_are_refused_naming_the_field(storage, ref, reason):
    with pytest.raises(ConfigurationError, match="^`log_ref`") as caught:
        storage.resolve(ref, "log_ref")
    assert reason in str(caught.value)


@pytest.mark.fast
def test_file_urls_without_a_host_and_paths_inside_the_root_resolve(storage):
    assert storage.resolve(f"file://{storage.root}/a.md", "log_ref").path == storage.root / "a.md"
    assert storage.resolve("jobs/a/log.json", "log_ref").path == storage.root / "jobs/a/log.json"
    assert storage.resolve(str(storage.root / "x.md"), "log_ref").path == storage.root / "x.md"


@pytest.mark.fast
def test_a_symlink_inside_the_root_pointing_out_is_refused(storage, outside):
    outside.mkdir()
    storage.root.mkdir(parents=True)
    (storage.root / "link").symlink_to(outside)
    with pytest.raises(ConfigurationError, match="outside the storage root"):
        storage.resolve("link/log.json", "log_ref")


# The second line: a Location built past `resolve` still cannot put a spooled byte outside the spool.
ESCAPING_KEYS = ["/{outside}/x.md", "../../../../../../../../../../..{outside}/x.md", "a/../../x.md", "", "dir/"]


@pytest.mark.fast
@pytest.mark.parametrize("key", ESCAPING_KEYS)
async def test_a_spooled_write_never_lands_outside_the_spool(storage, outside, key):
    key = key.format(outside=outside)
    location = Location(ref=f"s3://no-such-bucket/{key}", bucket="no-such-bucket", key=key)
    with pytest.raises(StorageError, match="outside the spool|names no object") as caught:
        await storage.write(location, b"x")
    assert not isinstance(caught.value, StorageSpooled)
    with pytest.raises(StorageError, match="outside the spool|names no object"):
        await storage.write_spooled(location, b"x")
    assert not outside.exists()
    assert not (storage.root / "x.md").exists() and not (storage.root / ".spool" / "x.md").exists()


@pytest.mark.fast
async def test_a_spool_folder_symlinked_out_is_not_written_through(storage, outside):
    outside.mkdir()
    storage.spool.mkdir(parents=True)
    (storage.spool / "no-such-bucket").symlink_to(outside)
    location = storage.resolve("s3://no-such-bucket/jobs/x.md", "output_ref")
    with pytest.raises(StorageError, match="outside the spool"):
        await storage.write(location, b"x")
    assert list(outside.iterdir()) == []


@pytest.mark.fast
async def test_drain_uploads_spooled_files_and_never_follows_links_out(tmp_path, outside):
    store = RecordingStore()
    storage = Storage(tmp_path / "root", store)
    outside.mkdir()
    (outside / "secret").write_bytes(b"worker secret")
    (outside / "dir").mkdir()
    (outside / "dir" / "file").write_bytes(b"another secret")
    (storage.spool / "bucket-ok" / "jobs").mkdir(parents=True)
    (storage.spool / "bucket-ok" / "jobs" / "log.json").write_bytes(b"{}")
    (storage.spool / "bucket-ok" / "jobs" / "stolen").symlink_to(outside / "secret")
    (storage.spool / "bucket-ok" / "linked-dir").symlink_to(outside / "dir")
    (storage.spool / "Not_A_Bucket").mkdir()
    (storage.spool / "Not_A_Bucket" / "x").write_bytes(b"x")
    uploaded = await storage.drain_spool()
    assert uploaded == ["s3://bucket-ok/jobs/log.json"] and list(store.written) == uploaded
    assert (outside / "secret").read_bytes() == b"worker secret"
    assert (outside / "dir" / "file").read_bytes() == b"another secret"


# Through the flow: refused before any call, with the field named.

async def test_a_nul_byte_in_a_local_ref_is_refused_before_any_call(factory_env):
    state = await run_job(output_ref="out\x00put/")
    assert state.is_failed()
    assert "`output_ref`" in state.message and "control character" in state.message
    assert "embedded null byte" not in state.message
    assert factory_env.requests == []


async def test_a_traversing_input_ref_is_refused_by_its_index(factory_env, storage_root):
    (storage_root / "inputs").mkdir(parents=True, exist_ok=True)
    for name in ("a.txt", "b.txt", "c.txt"):
        (storage_root / "inputs" / name).write_text("reference")
    refs = ["inputs/a.txt", "inputs/b.txt", "inputs/c.txt", "s3://bucket-ok/../../etc/passwd"]
    state = await run_job(input_refs=refs)
    assert state.is_failed() and "`input_refs[3]`" in state.message and "'..'" in state.message
    assert factory_env.requests == []


# `input_refs` is bounded in the flow's own parameter schema, so the API refuses it when the run is created.

@pytest.mark.fast
def test_the_flow_schema_bounds_input_refs():
    schema = parameter_schema(factory).model_dump_for_openapi()
    too_many = job_params(input_refs=[f"inputs/{i}.txt" for i in range(MAX_INPUT_REFS + 1)])
    errors = validate(too_many, schema)
    assert [list(e.path) for e in errors] == [["input_refs"]]
    assert validate(job_params(input_refs=["inputs/a.txt"] * MAX_INPUT_REFS), schema) == []


async def test_the_deployment_refuses_too_many_input_refs_at_creation(deployment):  # noqa: F811
    refs = [f"inputs/{i}.txt" for i in range(MAX_INPUT_REFS + 1)]
    with pytest.raises(PrefectHTTPStatusError) as caught:
        await run_deployment(deployment, parameters=job_params(input_refs=refs), timeout=0)
    assert caught.value.response.status_code == 409
    assert "field 'input_refs'" in caught.value.response.json()["detail"]

