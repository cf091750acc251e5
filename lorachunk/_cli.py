"""The ``lorachunk`` command: the only code that prints or exits.

Exit codes: 0 ok, 1 verification failed, 2 bad input or usage, 3 store or network error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lorachunk
from lorachunk._digest import ALGORITHMS
from lorachunk._exceptions import IntegrityError, LorachunkError, StoreError
from lorachunk._info import info_dict, ls_dicts, unpacked
from lorachunk._layout import is_adapter, natural_key
from lorachunk._threads import Progress

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


def parse_size(text: str) -> int:
    """``"500MB"``, ``"2GiB"``, ``"10k"`` or plain bytes → bytes."""
    units = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}
    value = text.strip().lower().removesuffix("b")
    number = value.rstrip("kmgti")
    unit = value[len(number) :]
    try:
        size = float(number) * units[unit]
    except (KeyError, ValueError):
        size = math.nan
    if not 0 <= size < math.inf:
        raise lorachunk.UsageError(f"cannot read size {text!r}; use e.g. 500MB or 2GiB (0 or more)")
    return int(size)


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
def _progress(enabled: bool, description: str, *, shards: bool = False) -> Iterator[Progress | None]:
    """A tqdm bar on stderr (bytes and rate; with ``shards``, one call per shard is counted too)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=0, unit="B", unit_scale=True, desc=description, file=sys.stderr) as bar:
        count = 0

        def update(done: int, total: int) -> None:
            nonlocal count
            bar.total = total
            if shards:
                count += 1
                bar.set_postfix_str(_count(count, "shard"), refresh=False)
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
            args.src, args.dest, splits=_split_option(args.split), level=args.level, hash=args.hash, progress=progress
        )
    if not args.quiet:
        counts = f"{_count(len(manifest.modules), 'module')}, {_count(len(manifest.splits), 'split')}"
        print(f"packed {manifest.source.name}: {counts}")
        print(f"{_size(manifest.source.size)} -> {_size(manifest.stored_size)} in shards into {args.dest}")
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
        f"(shards {_size(info['stored_bytes'])} + manifest {_size(info['manifest_bytes'])}), "
        f"{info['ratio']:.2f}x compression"
    )
    print(f"modules   {info['modules']}")
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
    if store["manifests"] > 1:
        saved = store["referenced_stored_bytes"] - store["unique_stored_bytes"]
        print(
            f"store     {store['manifests']} manifests reference {_size(store['referenced_stored_bytes'])} of shards; "
            f"{_size(store['unique_stored_bytes'])} stored once (dedup saves {_size(saved)})"
        )
    return EXIT_OK


def cmd_ls(args: argparse.Namespace) -> int:
    rows = ls_dicts(args.dest)
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return EXIT_OK
    width = max(len(row["source"]) for row in rows)
    for row in rows:
        mark = "*" if row["latest"] else " "
        when = (row["written"] or "")[:16].replace("T", " ")
        print(
            f"{mark} {row['manifest'].partition(':')[2][:12]}  {row['source']:<{width}}  {row['root']}  "
            f"{_size(row['stored_bytes']):>9} stored, {_size(row['shared_bytes']):>9} shared  {when}".rstrip()
        )
    print(f"{_count(len(rows), 'LoRA')}; * is the latest")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    report = lorachunk.verify(args.dest)
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2, sort_keys=True))
    elif not args.quiet:
        counts = f"{_count(report.manifests, 'manifest')}, {_count(report.shards, 'shard')}"
        print(f"ok: {counts}, {_size(report.stored_bytes)} verified")
        if report.missing:
            held = ", ".join(report.complete_splits) or "none"
            print(f"partial copy: {_count(report.missing, 'shard')} not pulled; splits held whole: {held}")
        if report.unreferenced or report.temp_files:
            print(
                f"left over: {_count(report.unreferenced, 'shard')} no manifest names and "
                f"{_count(report.temp_files, 'temp file')} of writes that never finished (harmless; not removed)"
            )
    return EXIT_OK


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
    with _progress(not args.quiet, "pull", shards=True) as progress:
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
            progress=progress,
            **_store_options(args),
        )
    if not args.quiet:
        print(
            f"pulled {_count(report.shards, 'shard')} into {args.output}: {report.fetched} fetched "
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
            f"pushed {result.uploaded} new shards ({_size(result.uploaded_bytes)} with the manifest); "
            f"{result.skipped} were already in {result.repo_id}"
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
            (_count(info.shards, "shard"), _count(info.manifests, "manifest"), _count(info.decoded, "decoded module"))
        )
        print(f"holds     {counts}, {_size(info.bytes)}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorachunk",
        description="Chunked, verified storage of LoRA adapters.",
        epilog="exit codes: 0 ok, 1 verification failed, 2 bad input or usage, 3 store or network error",
    )
    parser.add_argument("--version", action="version", version=f"lorachunk {lorachunk.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = command("pack", cmd_pack, "pack a .safetensors LoRA into a folder of verified, compressed shards")
    p.add_argument("src", metavar="SRC", help="the .safetensors file, or a PEFT adapter folder")
    p.add_argument("dest", metavar="DEST", help="the store folder (created if missing; several LoRAs may share one)")
    p.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="NAME=GLOB",
        help="add a named split of modules matching GLOB (repeatable)",
    )
    p.add_argument(
        "--level",
        type=int,
        default=3,
        help="zstd level 1-22; below 16 (default 3) fast, 16 and up 1-2%% smaller on tiny-tensor LoRAs, far slower",
    )
    p.add_argument("--hash", choices=ALGORITHMS, default="xxh3-128", help="digest algorithm (sha256 resists tampering)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    source_help = "a packed folder, an http(s):// URL of one, hf://NAMESPACE/NAME[@REV][/PATH], or an fsspec URL"
    p = command("info", cmd_info, "show modules, splits, sizes and roots of a packed LoRA")
    p.add_argument(
        "dest", metavar="SOURCE", help=f"{source_help}; or a .safetensors file or PEFT folder: what pack would store"
    )
    p.add_argument("--manifest", help="manifest id or hex prefix (default: the latest packed)")
    p.add_argument("--json", action="store_true", help="machine-readable output (fields in docs/cli.md)")

    p = command("ls", cmd_ls, "list every LoRA (manifest) in a store: source, root, size, what it shares, the latest")
    p.add_argument("dest", metavar="SOURCE", help=source_help)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("verify", cmd_verify, "re-hash every manifest and shard in a store; exit 1 naming each bad one")
    p.add_argument("dest", metavar="SOURCE", help=source_help)
    p.add_argument("--json", action="store_true", help="print what was checked as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    p = command("unpack", cmd_unpack, "write a .safetensors file: the original, or only some splits/modules")
    p.add_argument("dest", metavar="SOURCE", help=source_help)
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write (a folder with --format peft)")
    p.add_argument(
        "--format",
        choices=["safetensors", "peft"],
        default="safetensors",
        help="peft: a folder with adapter_model.safetensors and the files packed with it",
    )
    p.add_argument("--split", action="append", default=[], metavar="NAME", help="only this split (repeatable)")
    p.add_argument(
        "--module", action="append", default=[], metavar="GLOB", help="only modules matching GLOB (repeatable)"
    )
    p.add_argument("--layers", metavar="RANGE", help="only these layers of a transformer adapter, e.g. 0-15 or 0,2,5-7")
    p.add_argument("--manifest", help="manifest id or hex prefix (default: the latest packed)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    p = command("pull", cmd_pull, "copy a packed LoRA, or some splits of it, into a local folder, verifying each shard")
    p.add_argument("source", metavar="SOURCE", help=source_help)
    p.add_argument("-o", "--output", required=True, help="the local folder (created if missing)")
    p.add_argument("--split", action="append", default=[], metavar="NAME", help="only this split (repeatable)")
    p.add_argument(
        "--module", action="append", default=[], metavar="GLOB", help="only modules matching GLOB (repeatable)"
    )
    p.add_argument("--layers", metavar="RANGE", help="only these layers of a transformer adapter, e.g. 0-15 or 0,2,5-7")
    p.add_argument("--manifest", help="manifest id (default: the source's latest)")
    p.add_argument("--root", help="fail unless the manifest's Merkle root is this one")
    p.add_argument("--concurrency", type=int, help="shards fetched at once (default: 16 remote, CPU count local)")
    p.add_argument("--no-cache", action="store_true", help="do not read or fill the shared cache")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'", help="HTTP header (repeatable)")
    p.add_argument("--max-rate", metavar="SIZE", help="cap the download rate, bytes per second (e.g. 2MB)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a connection or data (default 30)")
    p.add_argument(
        "--min-rate",
        metavar="SIZE",
        help="per request, bytes per second below which a transfer counts as stalled and is retried (default 16kB)",
    )
    p.add_argument("--retries", type=int, default=5, help="retries on errors, 429 and 5xx (default 5)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    p = command("push", cmd_push, "publish a LoRA to a Hugging Face Hub repo, uploading only the shards it lacks")
    p.add_argument(
        "src", metavar="SRC", help="a packed folder, a .safetensors file or a PEFT folder (packed on the fly)"
    )
    p.add_argument("repo_id", metavar="REPO_ID", help="NAMESPACE/NAME; created if missing")
    p.add_argument("--revision", help="branch to commit to (default main)")
    p.add_argument("--repo-type", choices=["model", "dataset"], default="model")
    p.add_argument("--path", help="folder inside the repo (default: its root)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--message", help="commit message")
    p.add_argument("--update-card", action="store_true", help="rewrite README.md even if the repo has one")
    p.add_argument("--split", action="append", default=[], metavar="NAME=GLOB", help="when packing: extra split")
    p.add_argument("--level", type=int, help="when packing: zstd level 1-22 (default 3; see pack)")
    p.add_argument("--hash", choices=ALGORITHMS, help="when packing: digest algorithm")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    p = command("compose", cmd_compose, "make a new LoRA from splits of others, reusing their shards")
    p.add_argument("dest", metavar="DEST", help="the store to write into (shards already there are not copied)")
    p.add_argument(
        "--take",
        action="append",
        required=True,
        metavar="NAME=SOURCE[#MANIFEST][:SPLIT]",
        help="a part: the split SPLIT (default: all) of the packed LoRA at SOURCE, its latest or MANIFEST (repeatable)",
    )
    p.add_argument("--scale", action="append", default=[], metavar="NAME=F", help="bake strength F into a part")
    p.add_argument("--prefer", action="append", default=[], metavar="NAME", help="this part wins shared modules")
    p.add_argument("--name", default="composed.safetensors", help="file name the result unpacks to")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    p = command("cache", cmd_cache, "show, check, shrink or empty the shared shard cache")
    p.add_argument("action", choices=["info", "verify", "prune", "clear"])
    p.add_argument("--max-size", metavar="SIZE", help="for prune: evict least recently used down to SIZE (e.g. 2GB)")
    p.add_argument("--cache-dir", help="the cache folder (default $LORACHUNK_CACHE or the user cache folder)")
    p.add_argument("--json", action="store_true", help="for info and verify: print the result as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except IntegrityError as exc:
        print(f"lorachunk: verification failed: {exc}", file=sys.stderr)
        return EXIT_VERIFY
    except StoreError as exc:
        print(f"lorachunk: {exc}", file=sys.stderr)
        return EXIT_STORE
    except LorachunkError as exc:
        print(f"lorachunk: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lorachunk info | head`
        sys.stderr.close()
        return EXIT_OK
    return code
