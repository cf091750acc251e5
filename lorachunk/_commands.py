"""The command handlers of the ``lorachunk`` CLI (:mod:`lorachunk._cli` parses the arguments):
each runs one command and prints its result; the only code besides the parser that prints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lorachunk
from lorachunk._info import info_dict, ls_dicts, unpacked
from lorachunk._layout import is_adapter, natural_key
from lorachunk._threads import Progress
from lorachunk._units import parse_size

EXIT_OK, EXIT_VERIFY, EXIT_USAGE, EXIT_STORE = 0, 1, 2, 3
#: How `info` names each kind of split, in the order it lists them (docs/splits.md).
SPLIT_KINDS = {
    "component": "component",
    "b-lora": "B-LoRA",
    "block": "block",
    "block-weight": "LoRA Block Weight",
    "layer": "layer",
    "family": "attn/mlp",
    "projection": "projection",
    "part": "composed from",
    "user": "yours",
}


NOT_AN_ADAPTER = (
    "note: no tensor has an adapter's name (lora_A, lora_down, hada_, lokr_ …): this looks like a "
    "model checkpoint, not a LoRA; it is packed all the same"
)


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value, unit = next((n / 1000**i, u) for i, u in ((3, "GB"), (2, "MB"), (1, "kB")) if n >= 1000**i)
    return f"{value:.1f} {unit}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@contextmanager
def _progress(enabled: bool, description: str, *, records: bool = False) -> Iterator[Progress | None]:
    """A tqdm bar on stderr (bytes and rate; with ``records``, one call per record is counted too)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=0, unit="B", unit_scale=True, desc=description, file=sys.stderr) as bar:
        count = 0

        def update(done: int, total: int) -> None:
            nonlocal count
            bar.total = total
            if records:
                count += 1
                bar.set_postfix_str(_count(count, "record"), refresh=False)
            bar.update(done - bar.n)

        yield update


def _layers_option(value: str | None) -> list[int] | None:
    """``--layers 0-15`` or ``0,2,5-7`` → the layer indices."""
    if value is None:
        return None
    layers: list[int] = []
    for part in value.split(","):
        first, sep, last = part.strip().partition("-")
        if not first.isascii() or not first.isdigit() or (sep and (not last.isascii() or not last.isdigit())):
            raise lorachunk.UsageError(f"--layers wants indices and ranges like 0-15 or 0,2,5-7, got {value!r}")
        layers.extend(range(int(first), int(last) + 1) if sep else [int(first)])
    return layers


def _split_option(values: Sequence[str]) -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {}
    for value in values:
        name, sep, glob = value.partition("=")
        if not sep or not name or not glob:
            raise lorachunk.UsageError(f"--split wants NAME=GLOB, got {value!r}")
        splits.setdefault(name, []).append(glob)
    return splits


def cmd_pack(args: argparse.Namespace) -> int:
    with _progress(not args.quiet, "pack") as progress:
        manifest = lorachunk.pack(
            args.src,
            args.dest,
            splits=_split_option(args.split),
            level=args.level,
            hash=args.hash,
            pack_size=_mib(args.pack_size),
            name=args.name,
            progress=progress,
        )
    if not args.quiet:
        counts = f"{_count(len(manifest.modules), 'module')}, {_count(len(manifest.splits), 'split')}"
        print(f"packed {manifest.source.name} as {manifest.name}: {counts}")
        packs = _count(len(manifest.packs), "pack")
        print(f"{_size(manifest.source.size)} -> {_size(manifest.stored_size)} in {packs} into {args.dest}")
        print(f"root {manifest.root}")
        if not is_adapter(manifest.owners):
            print(NOT_AN_ADAPTER)
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    with _progress(unpacked(args.dest), "pack in memory") as progress:
        info = info_dict(args.dest, args.manifest, progress=progress)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return EXIT_OK
    if not info["packed"]:
        print(f"(not packed: what `lorachunk pack {args.dest} DEST` would store)")
    print(f"LoRA      {info['source']['name']} ({_size(info['source']['size'])}, {_count(info['tensors'], 'tensor')})")
    print(f"root      {info['root']}")
    print(f"manifest  {info['manifest']}")
    codec = info["codec"]
    # The codec config is the one part of a manifest read as free-form JSON: shown escaped.
    shown_codec = ascii(f"{codec.get('id')} level {codec.get('level')}")[1:-1]
    print(f"format    {info['format']}, codec {shown_codec}, hash {info['hash']}")
    print(
        f"stored    {_size(info['stored_bytes'] + info['manifest_bytes'])} "
        f"({_count(info['packs'], 'pack')} {_size(info['stored_bytes'])} + manifest {_size(info['manifest_bytes'])}), "
        f"{info['ratio']:.2f}x compression"
    )
    print(f"modules   {info['modules']}")
    partial = info["partial"]
    if partial is not None:
        held = ", ".join(partial["splits_held_whole"][:12]) or "none"
        print(
            f"partial   a copy holding {partial['modules']} of {info['modules']} modules "
            f"({_size(partial['stored_bytes'])} of {_size(info['stored_bytes'])}); splits held whole: {held}"
        )
    if info["in_no_split"]:
        names = ", ".join(info["in_no_split"][:5]) + (", …" if len(info["in_no_split"]) > 5 else "")
        print(f"unsplit   {_count(len(info['in_no_split']), 'module')} in no split (load whole or by name): {names}")
    if not info["adapter"]:
        print(f"kind      {NOT_AN_ADAPTER.removeprefix('note: ')}")
    if info["files"]:
        print(f"files     {', '.join(info['files'])} (packed with the tensors, pinned by the root)")
    if info["splits"]:
        print("splits")
        labels = [f"{s['name']} ({SPLIT_KINDS.get(s['kind'], s['kind'])})" for s in info["splits"]]
        width = max(map(len, labels))
        order = list(SPLIT_KINDS)
        ranked = sorted(
            zip(labels, info["splits"], strict=True),
            key=lambda pair: (
                order.index(pair[1]["kind"]) if pair[1]["kind"] in order else 9,
                natural_key(pair[1]["name"]),
            ),
        )
        for label, s in ranked:
            noun = "module" if s["modules"] == 1 else "modules"
            print(f"  {label + ':':<{width + 1}} {s['modules']:>5} {noun:<7} {_size(s['stored_bytes']):>9}")
    store = info["store"]
    if store["manifests"] > 1 and store["unique_stored_bytes"] is None:
        print(f"store     {store['manifests']} LoRA versions (`lorachunk ls` lists them)")
    elif store["manifests"] > 1:
        saved = store["referenced_stored_bytes"] - store["unique_stored_bytes"]
        print(
            f"store     {store['manifests']} manifests reference {_size(store['referenced_stored_bytes'])} of records; "
            f"{_size(store['unique_stored_bytes'])} stored once (dedup saves {_size(saved)})"
        )
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    rows = ls_dicts(args.dest, all_versions=args.all)
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return EXIT_OK
    width = max((len(row["name"]) for row in rows), default=4)
    for row in rows:
        mark = "*" if row["latest"] else " "
        version = f"v{row['version']}/{row['versions']}"
        base = row["base_model"] or "-"
        print(
            f"{mark} {row['name']:<{width}}  {version:>7}  {row['manifest'].partition(':')[2][:12]}  "
            f"{_size(row['stored_bytes']):>9} stored, {_size(row['shared_bytes']):>9} shared  {base}  "
            f"{row['added'][:16].replace('T', ' ')}"
        )
    names = len({row["name"] for row in rows})
    print(f"{_count(names, 'LoRA')}{', every version' if args.all else ''}; * is the latest packed")
    return EXIT_OK


def cmd_adapter(args: argparse.Namespace) -> int:
    path = lorachunk.adapter_path(
        args.dest,
        splits=args.split,
        layers=_layers_option(args.layers),
        format=args.format,
        root=args.root,
        cache_dir=args.cache_dir,
    )
    print(path)
    return EXIT_OK


def cmd_rm(args: argparse.Namespace) -> int:
    removed = lorachunk.remove(args.dest)
    if not args.quiet:
        print(f"removed {_count(len(removed), 'version')}; `lorachunk repack --prune` frees their records")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    report = lorachunk.verify(args.dest)
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2, sort_keys=True))
    elif not args.quiet:
        counts = f"{_count(report.manifests, 'manifest')}, {_count(report.records, 'module record')}"
        print(f"ok: {counts}, {_size(report.stored_bytes)} verified")
        if report.missing:
            held = ", ".join(report.complete_splits) or "none"
            print(f"partial copy: {_count(report.missing, 'record')} not pulled; splits held whole: {held}")
        if report.unreferenced or report.temp_files:
            print(
                f"left over: {_count(report.unreferenced, 'object')} no manifest names and "
                f"{_count(report.temp_files, 'temp file')} of writes that never finished "
                "(harmless; `lorachunk repack --prune` removes them)"
            )
        if report.foreign:
            shown = ", ".join(report.foreign[:5]) + (", …" if len(report.foreign) > 5 else "")
            print(f"not lorachunk's: {_count(len(report.foreign), 'file')} ({shown}); never read or removed")
    return EXIT_OK


def cmd_repack(args: argparse.Namespace) -> int:
    report = lorachunk.repack(args.dest, pack_size=_mib(args.pack_size), prune=args.prune, force=args.force)
    if report.locks_broken:
        print(f"note: broke {_count(report.locks_broken, 'lock')} of other programs (--force)", file=sys.stderr)
    if not args.quiet:
        print(
            f"repacked {_count(report.manifests, 'manifest')}: {report.rewritten} rewritten "
            f"({report.converted} from lorachunk/1), {_count(report.packs_written, 'pack')} "
            f"({_size(report.bytes_written)}) written"
        )
        if args.prune:
            print(f"pruned {_count(report.deleted, 'object')} ({_size(report.deleted_bytes)}) no manifest names")
            if report.temp_files_removed or report.temp_files_kept:
                kept = f", kept {report.temp_files_kept} younger than 30 minutes" if report.temp_files_kept else ""
                print(f"removed {_count(report.temp_files_removed, 'temp file')} of killed writers{kept}")
    return EXIT_OK


def _mib(value: int) -> int:
    """``--pack-size`` in bytes; the library checks the range."""
    if not 1 <= value <= 128:
        raise lorachunk.UsageError(f"--pack-size must be 1 to 128 (MiB), got {value}")
    return value * 1024 * 1024


def _store_options(args: argparse.Namespace) -> dict[str, Any]:
    """HTTP options from the command line; they apply to http(s):// and hf:// sources only."""
    if not str(args.source).startswith(("http://", "https://", "hf://")):
        return {}
    headers = {}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise lorachunk.UsageError("--header wants 'Name: value'")
        headers[name.strip()] = value.strip()
    options: dict[str, Any] = {"headers": headers, "timeout": args.timeout, "retries": args.retries}
    if args.min_rate:
        options["min_rate"] = parse_size(args.min_rate)
    if args.max_rate:
        options["max_bytes_per_s"] = parse_size(args.max_rate)
    return options


def cmd_pull(args: argparse.Namespace) -> int:
    with _progress(not args.quiet, "pull", records=True) as progress:
        report = lorachunk.pull(
            args.source,
            args.output,
            splits=args.split or None,
            modules=args.module or None,
            layers=_layers_option(args.layers),
            manifest=args.manifest,
            root=args.root,
            concurrency=args.concurrency,
            cache=False if args.no_cache else "auto",
            **({"max_gap": parse_size(args.max_gap)} if args.max_gap is not None else {}),
            deadline=args.deadline,
            progress=progress,
            **_store_options(args),
        )
    if not args.quiet:
        print(
            f"pulled {_count(report.records, 'record')} into {args.output}: {report.fetched} fetched "
            f"({_size(report.fetched_bytes)}), {report.cached} from the cache or already there"
        )
    return EXIT_OK


def cmd_push(args: argparse.Namespace) -> int:
    pack_options: dict[str, Any] = {}
    if args.split:
        pack_options["splits"] = _split_option(args.split)
    if args.level is not None:
        pack_options["level"] = args.level
    if args.hash is not None:
        pack_options["hash"] = args.hash
    result = lorachunk.push(
        args.src,
        args.repo_id,
        revision=args.revision,
        repo_type=args.repo_type,
        path=args.path,
        private=True if args.private else None,
        create_pr=args.create_pr,
        message=args.message,
        update_card=args.update_card,
        **pack_options,
    )
    if not args.quiet:
        print(
            f"pushed {_count(result.uploaded, 'pack')} ({_size(result.uploaded_bytes)} with the manifest) "
            f"in one commit; {_count(result.skipped, 'module record')} already in {result.repo_id}"
        )
        print(f"commit    {result.pr_url or result.commit_url}")
        print(f"root      {result.root}")
    return EXIT_OK


def cmd_compose(args: argparse.Namespace) -> int:
    from lorachunk._compose import parse_take

    scales = {}
    for value in args.scale:
        name, sep, factor = value.partition("=")
        try:
            scales[name] = float(factor)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise lorachunk.UsageError(f"--scale wants NAME=FACTOR, got {value!r}")
    manifest = lorachunk.compose(
        args.dest, [parse_take(t) for t in args.take], scales=scales, prefer=args.prefer, name=args.name
    )
    if not args.quiet:
        parts = ", ".join(f"{s.name} ({_count(len(s.modules), 'module')})" for s in manifest.splits if s.kind == "part")
        print(f"composed {manifest.source.name} into {args.dest}: {parts}")
        print(f"root {manifest.root}")
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    cache = lorachunk.Cache(args.cache_dir)
    if args.action == "info":
        info = cache.info()
        if args.json:
            print(json.dumps(dataclasses.asdict(info) | {"root": str(info.root)}, indent=2, sort_keys=True))
            return EXIT_OK
        print(f"cache     {info.root}")
        counts = ", ".join(
            (_count(info.records, "record"), _count(info.manifests, "manifest"), _count(info.decoded, "decoded module"))
        )
        counts += f", {_count(info.bundles, 'decoded LoRA')}" if info.bundles else ""
        counts += f", {_count(info.adapters, 'adapter folder')}" if info.adapters else ""
        cap = "no cap" if cache.max_size is None else f"cap {_size(cache.max_size)} (LORACHUNK_CACHE_MAX_SIZE)"
        print(f"holds     {counts}, {_size(info.bytes)}; {cap}, least recently used evicted first")
    elif args.action == "verify":
        bad = cache.verify()
        if args.json:
            print(json.dumps({"root": str(cache.root), "removed": [str(p) for p in bad]}, indent=2, sort_keys=True))
            return EXIT_VERIFY if bad else EXIT_OK
        for path in bad:
            print(f"removed corrupt entry {path}", file=sys.stderr)
        if bad:
            return EXIT_VERIFY
        print(f"ok: every entry in {cache.root} matches its name")
    elif args.action == "prune":
        if args.max_size is None:
            raise lorachunk.UsageError("cache prune needs --max-size (e.g. --max-size 2GB)")
        print(f"freed {_size(cache.prune(parse_size(args.max_size)))}")
    else:
        print(f"freed {_size(cache.clear())}")
    return EXIT_OK


def cmd_unpack(args: argparse.Namespace) -> int:
    with _progress(not args.quiet, "unpack") as progress:
        out = lorachunk.unpack(
            args.dest,
            args.output,
            splits=args.split,
            modules=args.module,
            layers=_layers_option(args.layers),
            manifest=args.manifest,
            format=args.format,
            progress=progress,
        )
    if not args.quiet:
        print(f"wrote {out}")
    return EXIT_OK
