from __future__ import annotations

import os

# Before huggingface_hub is imported anywhere: uploads to the test Hub take the plain LFS path.
os.environ["HF_HUB_DISABLE_XET"] = "1"
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import lorachunk
from lorachunk._repository import record_key
from lorachunk.testing.http_server import FolderServer, serve
from lorachunk.testing.hub_server import HubServer, serve_hub

DATA = Path(__file__).parent / "data"
FIXTURES = sorted((DATA / "loras").glob("*.safetensors"))


@pytest.fixture(params=FIXTURES, ids=[p.stem for p in FIXTURES])
def fixture_lora(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


@pytest.fixture
def falcon() -> Path:
    return DATA / "loras" / "smart_falcon_4_lokr.safetensors"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or fills the user's real cache."""
    monkeypatch.setenv("LORACHUNK_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture(autouse=True)
def _doctest_tmp_path(doctest_namespace: dict[str, object], tmp_path: Path) -> None:
    doctest_namespace["tmp_path"] = tmp_path


def pack_files(store: Path) -> list[Path]:
    """The pack files of a store folder (fanned out under ``packs/``)."""
    return sorted(p for p in (store / "packs").rglob("*") if p.is_file())


@contextmanager
def serving(root: Path) -> Iterator[FolderServer]:
    """A real HTTP server on 127.0.0.1 serving the new folder ``root``."""
    root.mkdir()
    with serve(root) as server:
        yield server


@pytest.fixture
def served(tmp_path: Path) -> Iterator[FolderServer]:
    """A real HTTP server on 127.0.0.1 serving ``tmp_path / "www"``."""
    with serving(tmp_path / "www") as server:
        yield server


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's standalone S3 server on 127.0.0.1 (the closest thing to S3 offline), one bucket ``lorachunk``."""
    pytest.importorskip("s3fs", reason="the fsspec test extra is not installed")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="lorachunk")
    try:
        yield endpoint
    finally:
        server.stop()


def s3_options(endpoint: str) -> dict[str, object]:
    return {"client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}, "skip_instance_cache": True}


HUB_TOKEN = "hf_test_5f1c0ffee_do_not_leak"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A Hub-protocol server on 127.0.0.1 that wants ``HUB_TOKEN``; HF_ENDPOINT and HF_TOKEN point at it."""
    with serve_hub(token=HUB_TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield server


SAM = DATA / "loras" / "sam_lora_rank16.safetensors"
DISNEY = DATA / "loras" / "cloneofsimo_lora_disney.safetensors"
ATTN = DATA / "loras" / "diffusers_sd15_attnproc.safetensors"


def pack_gets(server: FolderServer) -> list[str]:
    """The requests for packs (each carries many module records)."""
    return [r.path for r in server.gets("/packs/")]


def flip_record(store: Path, module: lorachunk.Module, at: int = 0) -> None:
    """Flip one bit of ``module``'s stored record where the store ``store`` keeps it."""
    path = store / record_key(module)
    data = bytearray(path.read_bytes())
    data[module.offset + at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def published(served: FolderServer) -> Iterator[tuple[FolderServer, lorachunk.Manifest]]:
    """The attention-processor LoRA packed into the folder the server serves: one pack of 2.8 MB,
    so a module is read by range and the whole LoRA in one request."""
    manifest = lorachunk.pack(ATTN, served.root)
    yield served, manifest


def open_http(server: FolderServer, tmp_path: Path, **options: Any) -> lorachunk.LoRA:
    defaults: dict[str, Any] = {"cache": tmp_path / "cache", "retries": 3, "backoff": 0.01, "timeout": 5.0}
    return lorachunk.open(server.url, **(defaults | options))


def assert_cache_clean(cache: Path) -> None:
    """Every object in the cache hashes to its name, and no temp file is left."""
    assert lorachunk.Cache(cache).verify() == []
    assert not [p for p in cache.rglob(".*") if p.is_file()]
