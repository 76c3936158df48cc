"""Dataset conversion as a job array: one task per subject, all writing into one folder.

    python -m launchers.convert nsd --subjects 1 2 3 4 5 6 7 8 --partition cpu --cpus 8 \\
        --mem-gb 32 --hours 12 -- --root NSD_ROOT --out data/nsd

Everything after `--` is passed to `python -m data.convert DATASET` with `--subject N`
added per task. A task that is preempted or times out is requeued and resumes where it
stopped (conversions resume by themselves); subjects already converted finish at once.
`--cluster local` runs the tasks as local processes (no Slurm), `--cluster debug` in this
process. Logs go to `--logs` (default OUT/.convert/logs); `--wait` waits and reports every task.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import submitit

from data.convert import __main__ as convert


class ConvertSubject(submitit.helpers.Checkpointable):
    """One array task; on preemption submitit requeues the same call, which resumes."""

    def __call__(self, dataset: str, args: list[str], subject: int) -> int:
        code = convert.main([dataset, *args, "--subject", str(subject)])
        if code:
            raise RuntimeError(f"conversion of subject {subject} failed (exit {code}); see the log above")
        return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, theirs = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m launchers.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=sorted(convert.CONVERTERS))
    p.add_argument("--subjects", type=int, nargs="+", required=True)
    p.add_argument("--cluster", choices=["slurm", "local", "debug"], default=None, help="default: slurm if available")
    p.add_argument("--logs", type=Path, help="submitit log folder (default OUT/.convert/logs)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--cpus", type=int, default=4, help="CPUs per task (the converter's --workers)")
    p.add_argument("--mem-gb", type=int, default=16)
    p.add_argument("--hours", type=float, default=12)
    p.add_argument("--parallel", type=int, default=8, help="tasks running at once")
    p.add_argument("--wait", action="store_true", help="wait for every task and report each")
    args = p.parse_args(ours)
    try:  # check the converter's own arguments before anything is submitted
        parsed = convert.parser()[0].parse_args([args.dataset, *theirs, "--subject", str(args.subjects[0])])
    except SystemExit as e:
        return int(e.code or 2)
    if "--workers" not in theirs:
        theirs = [*theirs, "--workers", str(args.cpus)]
    executor = submitit.AutoExecutor(folder=args.logs or parsed.out / ".convert" / "logs", cluster=args.cluster)
    slurm = {k: v for k, v in {"slurm_partition": args.partition, "slurm_account": args.account,
                               "slurm_qos": args.qos}.items() if v}
    executor.update_parameters(name=f"convert-{args.dataset}", cpus_per_task=args.cpus, mem_gb=args.mem_gb,
                               timeout_min=int(args.hours * 60), slurm_array_parallelism=args.parallel, **slurm)
    n = len(args.subjects)
    jobs = executor.map_array(ConvertSubject(), [args.dataset] * n, [theirs] * n, args.subjects)
    print(f"submitted {n} conversion task(s): {jobs[0].job_id.split('_')[0]} (logs in {executor.folder})")
    if not args.wait:
        return 0
    failed = 0
    for subject, job in zip(args.subjects, jobs):
        try:
            job.result()
            print(f"subject {subject}: done")
        except Exception as e:  # noqa: BLE001 - report every task, then fail
            failed += 1
            print(f"subject {subject}: failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
