"""Dataset conversion as a job array: one task per subject, all writing into one folder.

    python -m launchers.convert nsd --subjects 1 2 3 4 5 6 7 8 --partition cpu --cpus-per-task 8 \\
        --mem-gb 32 --hours 12 -- --root NSD_ROOT --out data/nsd

Everything after `--` is passed to `python -m data.convert DATASET` with `--subject N`
added per task. A task that is preempted or times out is requeued and resumes where it
stopped (conversions resume by themselves); subjects already converted finish at once.
`--cluster local` runs the tasks as local processes side by side (no Slurm). The cluster
options are those of every launcher (launchers/cluster.py). Logs go to `--logs` (default
OUT/.convert/logs); `--wait` waits and reports every task.
"""
from __future__ import annotations

import argparse
import sys

import submitit

from data.cli import run_cli
from data.convert import __main__ as convert
from launchers import cluster


class ConvertSubject(submitit.helpers.Checkpointable):
    """One array task; on preemption submitit requeues the same call, which resumes."""

    def __call__(self, dataset: str, args: list[str], subject: int) -> int:
        code = convert.main([dataset, *args, "--subject", str(subject)])
        if code:
            raise RuntimeError(f"conversion of subject {subject} failed (exit {code}); see the log above")
        return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, theirs = cluster.split_argv(argv)
    p = argparse.ArgumentParser(prog="python -m launchers.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=sorted(convert.CONVERTERS))
    p.add_argument("--subjects", type=int, nargs="+", required=True)
    p.add_argument("--wait", action="store_true", help="wait for every task and report each")
    cluster.add_arguments(p, cpus=4, mem_gb=16, hours=12)
    args = p.parse_args(ours)
    try:  # check the converter's own arguments and the resources before anything is submitted
        parsed = convert.parser()[0].parse_args([args.dataset, *theirs, "--subject", str(args.subjects[0])])
    except SystemExit as e:
        return int(e.code or 2)
    def check_resources() -> None:
        cluster.resolve(args)

    code = run_cli(check_resources, report=True)
    if code:
        return code
    if "--workers" not in theirs:
        theirs = [*theirs, "--workers", str(args.cpus_per_task)]
    folder = args.logs or parsed.out / ".convert" / "logs"
    if args.cluster == "local":  # local processes, side by side
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        executor.update_parameters(timeout_min=int(args.hours * 60))
    else:
        executor = cluster.executor(args, folder, f"convert-{args.dataset}")
    n = len(args.subjects)
    jobs = executor.map_array(ConvertSubject(), [args.dataset] * n, [theirs] * n, args.subjects)
    print(f"submitted {n} conversion task(s): {jobs[0].job_id.split('_')[0]} (logs in {executor.folder})")
    if not args.wait:
        return 0
    return 1 if any(cluster.wait([(f"subject {s}", job) for s, job in zip(args.subjects, jobs)])) else 0


if __name__ == "__main__":
    sys.exit(main())
