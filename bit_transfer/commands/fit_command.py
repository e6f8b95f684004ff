"""`bit-transfer fit` from its arguments: the recipe to run or resume, the device settings checked
before anything compiles, then one process (commands/fit.py) or msrun's ranks (`--devices`, `--nodes`)."""

from __future__ import annotations

from bit_transfer.errors import UsageError
from bit_transfer.run import signals


def check_device_settings(r, ranks: int) -> None:
    """What the recipe asks of the device, refused in one line before any data is read or graph compiled."""
    from bit_transfer.system import device as runtime

    runtime.check_precision(r.train.precision, r.train.device)
    if r.train.device_id is not None and ranks > 1:
        raise UsageError(f"train.device_id is for one-process runs; with {ranks} ranks each uses its local rank's "
                         "device: remove train.device_id")


def _recipe_for_run(args):
    """The recipe of `fit`: the file given, or the one saved in the run directory to resume."""
    from pathlib import Path

    from bit_transfer.config import recipe

    if args.resume:
        if args.run_dir and Path(args.run_dir).expanduser().resolve() != Path(args.resume).expanduser().resolve():
            raise UsageError(f"--resume {args.resume} and --run-dir {args.run_dir} name two directories; a resumed run "
                             "continues in its own: drop --run-dir (or start a new run with --run-dir alone)")
        saved = Path(args.resume) / "recipe.yaml"
        if args.recipe and Path(args.recipe).resolve() != saved.resolve():
            return recipe.load(args.recipe, args.sets), args.resume
        if not saved.is_file():
            what = "does not exist" if not Path(args.resume).exists() else "has no recipe.yaml"
            raise UsageError(f"--resume {args.resume}: the directory {what}; pass the run directory that fit printed")
        return recipe.load(saved, args.sets), args.resume
    if not args.recipe:
        raise UsageError("fit needs a recipe (e.g. recipes/cifar10.yaml) or --resume RUN_DIR")
    return recipe.load(args.recipe, args.sets), args.run_dir


def fit_command(args) -> int:
    if args.node_rank >= args.nodes:
        raise UsageError(f"--node-rank {args.node_rank} is not below --nodes {args.nodes}; number the machines 0 .. nodes-1")
    if args.nodes > 1 and (args.master_addr is None or args.master_port is None):
        # each machine would otherwise wait for its own 127.0.0.1 and a port of its own choosing: a hang
        raise UsageError(f"--nodes {args.nodes} needs --master-addr and --master-port, the same on every machine "
                         "(node-rank 0's address and a free port there, e.g. --master-addr 10.0.0.1 --master-port 8118)")
    args.master_addr = args.master_addr or "127.0.0.1"
    r, run_dir = _recipe_for_run(args)
    check_device_settings(r, args.devices * args.nodes)
    if r.train.device in ("auto", "CPU"):  # a first run compiles the CPU kernels while MindSpore imports
        from bit_transfer.kernels import onednn as onednn_conv

        onednn_conv.prebuild()
    from bit_transfer.system import distributed
    from bit_transfer.commands import fit as train
    if (args.devices > 1 or args.nodes > 1) and not distributed.launched_by_msrun():
        return _launch_ranks(args, r, run_dir)
    distributed.watch_launcher()
    # --quiet is how this process prints, not part of the recipe (a resume must match the recipe)
    m = train.fit(r, run_dir=run_dir, quiet=True if args.quiet else None, stop_after=args.stop_after,
                  resume=bool(args.resume))
    if m.get("stopped_by_signal") and not m.get("reported"):  # (not a finished run's record, reported)
        # a rank's nonzero exit makes msrun kill the others, maybe while rank 0 still writes the
        # checkpoint; the launcher (`--devices`) returns the 130
        return 0 if distributed.launched_by_msrun() else 130
    return 0


def _launch_ranks(args, r, run_dir) -> int:
    """`fit --devices N`: check the data here (a bad image is one line, not N stack traces), claim the
    run directory, then start msrun with N workers running this same fit, and wait."""
    import functools
    from pathlib import Path

    from bit_transfer import data
    from bit_transfer.hyperrule import planning
    from bit_transfer.system import distributed
    from bit_transfer.run.rundir import RunDir

    signals.stop_at_once()  # before any rank starts there is nothing to stop but this check
    data.load(r.data).check_readable(r.data.workers)
    # the launcher holds the run for its ranks (rank 0 takes it over if the launcher dies); only the first
    # machine's: the others' ranks do not write
    run = RunDir.claim(run_dir, kind="fit", parent=r.log.dir, name=r.name, must_exist=bool(args.resume),
                       lock=args.node_rank == 0)
    run.check_recipe(r.to_dict(), same_plan=functools.partial(planning.same_plan, now=r))
    fit_args = [str(Path(args.recipe or run.path / "recipe.yaml").resolve())]
    fit_args += [f"--set={s}" for s in args.sets]
    if args.quiet:
        fit_args.append("--quiet")
    if args.stop_after is not None:
        fit_args.append(f"--stop-after={args.stop_after}")
    return distributed.launch(
        fit_args,
        run.path.resolve(),
        devices=args.devices,
        nodes=args.nodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
    )
