"""pull: a packed LoRA, or some splits of it, copied into a local folder and used offline."""

from __future__ import annotations

from pathlib import Path

import lorachunk
from lorachunk.testing.http_server import FolderServer


def test_pull_a_split_then_work_offline(published: tuple[FolderServer, lorachunk.Manifest], tmp_path: Path) -> None:
    server, manifest = published
    split = manifest.splits[0]
    report = lorachunk.pull(server.url, tmp_path / "copy", splits=[split.name], cache=False, retries=1)
    assert report.shards == report.fetched == len({manifest.module(n).shard for n in split.modules})
    server.shutdown()
    with lorachunk.open(tmp_path / "copy") as lora:
        assert lora.root == manifest.root
        got = lora.load(splits=[split.name])
    assert len(got) == sum(len(manifest.module(n).tensors) for n in split.modules)
    # The split's records, and nothing else, in one new pack of the copy.
    (pack,) = (tmp_path / "copy" / "packs").iterdir()
    assert pack.stat().st_size == sum(
        {manifest.module(n).shard: manifest.module(n).stored_size for n in split.modules}.values()
    )
