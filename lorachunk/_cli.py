"""The ``lorachunk`` command: the only code that prints or exits.

Exit codes: 0 ok, 1 verification failed, 2 bad input or usage, 3 store or network error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import lorachunk
from lorachunk._commands import (
    EXIT_OK,
    EXIT_STORE,
    EXIT_USAGE,
    EXIT_VERIFY,
    cmd_adapter,
    cmd_cache,
    cmd_compose,
    cmd_info,
    cmd_ls,
    cmd_pack,
    cmd_pull,
    cmd_push,
    cmd_repack,
    cmd_rm,
    cmd_unpack,
    cmd_verify,
)
from lorachunk._digest import ALGORITHMS
from lorachunk._exceptions import IntegrityError, LorachunkError, StoreError

__all__ = ["EXIT_OK", "EXIT_STORE", "EXIT_USAGE", "EXIT_VERIFY", "build_parser", "main"]

_PACK_SIZE_HELP = "MiB of module records per pack object, 1-128 (default 16; a smaller LoRA is one pack)"


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

    p = command("pack", cmd_pack, "pack a .safetensors LoRA into a folder of verified, compressed module records")
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
    p.add_argument("--pack-size", type=int, default=16, metavar="MIB", help=_PACK_SIZE_HELP)
    p.add_argument(
        "--name",
        help="the LoRA's name in the store (default: the file's stem or the folder's name); "
        "packing again under a name adds a version",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    source_help = (
        "a packed folder, an http(s):// URL of one, hf://NAMESPACE/NAME[@REV][/PATH], or an fsspec URL; "
        "#NAME, #NAME@N, #ROOT or #MANIFEST-ID after it picks a LoRA of a store of several"
    )
    p = command("info", cmd_info, "show modules, splits, sizes and roots of a packed LoRA")
    p.add_argument(
        "dest", metavar="SOURCE", help=f"{source_help}; or a .safetensors file or PEFT folder: what pack would store"
    )
    p.add_argument("--manifest", help="a name, manifest id or hex prefix (as #… after SOURCE; default: the latest)")
    p.add_argument("--json", action="store_true", help="machine-readable output (fields in docs/cli.md)")

    p = command("ls", cmd_ls, "list the LoRAs of a store by name: versions, sizes, what they share, base model")
    p.add_argument("dest", metavar="SOURCE", help=source_help)
    p.add_argument("--all", action="store_true", help="every version, not only each name's latest")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command(
        "adapter",
        cmd_adapter,
        "print the path of a verified adapter folder an engine reads (PEFT layout, or one .safetensors)",
    )
    p.add_argument("dest", metavar="SOURCE", help=source_help)
    p.add_argument("--split", action="append", default=[], metavar="NAME", help="only this split (repeatable)")
    p.add_argument("--layers", metavar="RANGE", help="only these layers, e.g. 0-15 (a pipeline stage)")
    p.add_argument("--format", choices=["peft", "safetensors"], help="default: peft if packed from a PEFT folder")
    p.add_argument("--root", help="fail unless the LoRA's Merkle root is this one")
    p.add_argument("--cache-dir", help="where adapter folders go (default: the shared cache's adapters/)")

    p = command("rm", cmd_rm, "remove a LoRA from a store: SOURCE#NAME (all versions), #NAME@N or #MANIFEST-ID")
    p.add_argument("dest", metavar="SOURCE#NAME", help="the store and what to remove")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    p = command("verify", cmd_verify, "re-hash every manifest, pack and record in a store; exit 1 naming each bad one")
    p.add_argument("dest", metavar="SOURCE", help=source_help)
    p.add_argument("--json", action="store_true", help="print what was checked as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    p = command("repack", cmd_repack, "rewrite a store: each LoRA in as few packs as it can, lorachunk/1 made /2")
    p.add_argument("dest", metavar="FOLDER", help="the store (a folder, or an fsspec URL that can be written)")
    p.add_argument("--pack-size", type=int, default=16, metavar="MIB", help=_PACK_SIZE_HELP)
    p.add_argument(
        "--prune",
        action="store_true",
        help="then delete the replaced manifests, what no manifest names, and temp files of killed writers "
        "older than 30 minutes (only names of lorachunk's own; other files stay)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="break other programs' locks first (only when they are known to be gone, e.g. a crashed host)",
    )
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

    p = command(
        "pull", cmd_pull, "copy a packed LoRA, or some splits of it, into a local folder, verifying each record"
    )
    p.add_argument("source", metavar="SOURCE", help=source_help)
    p.add_argument("-o", "--output", required=True, help="the local folder (created if missing)")
    p.add_argument("--split", action="append", default=[], metavar="NAME", help="only this split (repeatable)")
    p.add_argument(
        "--module", action="append", default=[], metavar="GLOB", help="only modules matching GLOB (repeatable)"
    )
    p.add_argument("--layers", metavar="RANGE", help="only these layers of a transformer adapter, e.g. 0-15 or 0,2,5-7")
    p.add_argument("--manifest", help="manifest id (default: the source's latest)")
    p.add_argument("--root", help="fail unless the manifest's Merkle root is this one")
    p.add_argument("--concurrency", type=int, help="requests in flight (default: 16 remote, CPU count local)")
    p.add_argument(
        "--max-gap",
        metavar="SIZE",
        help="ranges of one pack at most this far apart are fetched in one request (default 256kB; 0: exact ranges)",
    )
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
    p.add_argument(
        "--deadline",
        type=float,
        metavar="SECONDS",
        help="give up on the whole pull after this long (default: 5 minutes plus its bytes at 64 kB/s)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    p = command(
        "push", cmd_push, "publish a LoRA to a Hugging Face Hub repo in one commit, uploading only what it lacks"
    )
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

    p = command("compose", cmd_compose, "make a new LoRA from splits of others, reusing their records")
    p.add_argument("dest", metavar="DEST", help="the store to write into (records already there are not copied)")
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

    p = command("cache", cmd_cache, "show, check, shrink or empty the shared cache")
    p.add_argument("action", choices=["info", "verify", "prune", "clear"])
    p.add_argument("--max-size", metavar="SIZE", help="for prune: evict least recently used down to SIZE (e.g. 2GB)")
    p.add_argument("--cache-dir", help="the cache folder (default $LORACHUNK_CACHE or the user cache folder)")
    p.add_argument("--json", action="store_true", help="for info and verify: print the result as JSON")
    return parser


class _Notes(logging.Handler):
    """The library's INFO lines (which LoRA an open without a name took) as notes on the stderr
    of the moment (not the one there was when the handler was made)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"note: {record.getMessage()}", file=sys.stderr)


def _notes() -> None:
    log = logging.getLogger("lorachunk")
    if not any(isinstance(h, _Notes) for h in log.handlers):
        log.addHandler(_Notes())
        log.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _notes()
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
