"""`python -m data.convert DATASET --root DIR --subject N --out DIR [options]`.

Converts one subject per call (a Slurm array converts many into one folder at once).
Rerunning an interrupted command resumes it (paths are resolved before they are recorded, so
`--root data` and `--root /abs/data` are the same command); a subject already in the folder
is left as it is. A folder of another dataset or converter is refused before anything is
written. Bad input and failed writes (a full disk) end in one `error: ...` line naming the
file and exit status 2 (`data.cli.run_cli`), never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from data.cli import run_cli
from data.convert.output import abandon, begin, check_folder, converted, write_subject
from models.errors import InputError

CONVERTERS = {  # dataset name -> module with VERSION, add_arguments(parser), read_subject(args, work)
    "nsd": "data.convert.nsd",
    "mindeye1": "data.convert.mindeye1",
    "mindeye2": "data.convert.mindeye2",
    "god": "data.convert.god",
    "bold5000": "data.convert.bold5000",
    "hcp-rest": "data.convert.hcp_rest",
    "hcp-movie": "data.convert.hcp_movie",
}
COMMON = ("dataset", "out", "workers")  # arguments that do not change the shards


def parser() -> tuple[argparse.ArgumentParser, dict]:
    p = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="dataset", required=True, metavar="DATASET", help=", ".join(CONVERTERS))
    modules = {}
    for name, module in CONVERTERS.items():
        modules[name] = importlib.import_module(module)
        q = sub.add_parser(name, help=modules[name].__doc__.split("\n")[0])
        q.add_argument("--root", required=True, type=Path, help="folder of the downloaded files")
        q.add_argument("--subject", required=True, type=int, help="subject number")
        q.add_argument("--out", required=True, type=Path, help="dataset folder to write (shared by subjects)")
        q.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="processes encoding samples (output does not depend on it)")
        q.add_argument("--shard-mb", type=float, default=1024, help="shard size limit in MB")
        modules[name].add_arguments(q)
    return p, modules


def convert(argv: list[str] | None = None) -> int:
    p, modules = parser()
    args = p.parse_args(argv)
    for name, value in list(vars(args).items()):
        if isinstance(value, Path):
            setattr(args, name, value.resolve())
    module = modules[args.dataset]
    record = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in COMMON}
    converter = {"name": module.__name__, "version": module.VERSION, "args": record}
    check_folder(args.out, args.dataset, args.subject, converter)
    if converted(args.out, args.subject):
        print(f"{args.out}: subject {args.subject} is already converted; nothing to do")
        return 0
    created = not args.out.exists()
    try:
        source = module.read_subject(args, begin(args.out, args.subject, converter))
        entry = write_subject(args.out, source, converter, int(args.shard_mb * 2**20), args.workers)
    except (InputError, OSError):
        abandon(args.out, args.subject, created)
        raise
    sizes = ", ".join(f"{k} {v['n_samples']}" for k, v in entry["splits"].items())
    print(f"{args.out}: subject {args.subject} converted ({entry['n_voxels']} voxels; {sizes})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: convert(argv))


if __name__ == "__main__":
    sys.exit(main())
