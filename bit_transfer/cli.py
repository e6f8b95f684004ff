"""The `bit-transfer` command: plan, fit, eval, fewshot, export, predict, embed.

Usage errors (bad recipe, missing data or weights) print one line and exit with code 2;
heavy imports (MindSpore) happen inside the subcommands that need them.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys

from bit_transfer.settings import VERSION as __version__
from bit_transfer.run import signals
from bit_transfer.system import versions
from bit_transfer.errors import PLACE_OPTION, Interrupted, UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors keep the CLI's promise: one line on stderr, exit code 2, no usage block."""

    def error(self, message):
        hint = "" if message.startswith("argument ") else f"; see {self.prog} --help"
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse, but an unknown flag is reported by the subcommand it was given to, with did-you-mean."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            sub = _chosen_subparser(self, ns)
            flags = [f for f in sub._option_string_actions if f.startswith("--")]
            close = [difflib.get_close_matches(x.split("=")[0], flags, n=1) for x in extras if x.startswith("-")]
            hint = next((f" (did you mean {c[0]}?)" for c in close if c), "")
            sub.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return ns


def _chosen_subparser(parser: argparse.ArgumentParser, ns) -> argparse.ArgumentParser:
    """The subcommand's parser (for its name in error messages), else the parser itself."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(getattr(ns, action.dest, None), parser)
    return parser


def int_at_least(lo: int, hi: int | None = None):
    """argparse type: an integer in [lo, hi]; 0 devices, nodes or steps is never meant, so refuse it early."""

    def parse(text: str) -> int:
        span = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number {span}, got {text!r}") from None
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"must be a whole number {span}, got {n}")
        return n

    return parse


def add_recipe_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    """The recipe file and its --set overrides (plan, fit, eval, fewshot)."""
    p.add_argument("recipe", nargs="?" if optional else None, help="YAML recipe, e.g. recipes/cifar10.yaml")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, typed like YAML (repeatable): --set train.batch_split=8",
    )


def _add_device_args(p: argparse.ArgumentParser, launch: bool = False) -> None:
    """Data-parallel ranks: --devices per machine (x --nodes machines); msrun does the launching."""
    p.add_argument("--devices", type=int_at_least(1), default=1, metavar="N",
                   help="data-parallel ranks on this machine (msrun)")
    p.add_argument("--nodes", type=int_at_least(1), default=1, metavar="K",
                   help="machines taking part (each runs this command)")
    if launch:
        p.add_argument("--node-rank", type=int_at_least(0), default=0, help="this machine's index, 0 .. nodes-1")
        p.add_argument("--master-addr", default=None,
                       help="address of the node with node-rank 0 (needed with --nodes > 1; default 127.0.0.1)")
        p.add_argument("--master-port", type=int_at_least(1, 65535), default=None,
                       help="a free port on the master (default: any free port)")


def cmd_plan(args) -> int:
    from bit_transfer.commands.fit_command import check_device_settings
    from bit_transfer.config import recipe
    from bit_transfer.hyperrule import planning

    r = recipe.load(args.recipe, args.sets)
    check_device_settings(r, args.devices * args.nodes)
    info = planning.task_info(r)
    plan = planning.make_plan(r, info)
    layout = planning.batch_layout(plan.batch_size, r.train.batch_split, world=args.devices * args.nodes)
    if args.json:
        print(json.dumps(planning.plan_json(info, plan, layout) | {"trainable": planning.trainable(r, info)}, indent=2))
    else:
        print(planning.plan_report(r, info, plan, layout))
    return 0



def cmd_fit(args) -> int:
    from bit_transfer.commands.fit_command import fit_command

    return fit_command(args)


def cmd_eval(args) -> int:
    from bit_transfer.commands import eval as evalrun
    from bit_transfer.config import recipe

    r = recipe.load(args.recipe, args.sets)
    evalrun.eval_checkpoint(r, args.checkpoint, out_dir=args.out)
    return 0


def cmd_export(args) -> int:
    from bit_transfer.commands.export import earlier_export, export_from_checkpoint

    earlier = earlier_export(args.out, args.format)
    out = export_from_checkpoint(args.run_or_ckpt, args.format, args.out, image_size=args.image_size)
    again = f" (replaced the earlier {args.format} export in {args.out})" if earlier else ""
    print(f"exported {args.format}: {out}{again}")
    return 0


def parse_ints(text: str, option: str, minimum: int) -> list[int]:
    """'1,2,5,10' or '0-4' (an inclusive range) -> sorted distinct ints; one-line UsageError else."""
    example = "1,2,5,10" if minimum > 0 else "0,1,2 or 0-4"
    values: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if m:
            lo, hi = int(m[1]), int(m[2])
            if lo > hi:
                raise UsageError(f"{option} {text!r}: range {part!r} runs backwards; write it as {hi}-{lo}")
            values.update(range(lo, hi + 1))
        elif re.fullmatch(r"[+-]?\d+", part):
            values.add(int(part))
        else:
            raise UsageError(f"{option} {text!r}: {part!r} is not an integer; give a list like {example}")
    low = min(values)
    if low < minimum:
        raise UsageError(f"{option} {text!r}: {low} is below {minimum}; give a list like {example}")
    return sorted(values)




def add_fewshot_parser(subparsers) -> argparse.ArgumentParser:
    from bit_transfer.commands.fewshot.sweep import MODES  # no MindSpore import

    p = subparsers.add_parser(
        "fewshot",
        help="few-shot sweep: a run per (shots, seed), mean ± std table, plot (resumable)",
        description="Run the recipe on K images per class for every K in --shots and subset seed in --seeds, "
                    "evaluate each on the full eval split, and summarise mean ± std over seeds.",
    )
    add_recipe_args(p)
    p.add_argument("--shots", required=True, help="images per class, e.g. 1,2,5,10")
    p.add_argument("--seeds", default="0,1,2", help="few-shot subset seeds, e.g. 0,1,2 or 0-4 (default 0,1,2)")
    p.add_argument("--mode", choices=MODES,
                   help="finetune: train all weights; linear: frozen backbone, head on cached features "
                        "(default: the recipe's train.mode)")
    p.add_argument("--run-dir", metavar="DIR",
                   help="sweep directory (default runs/<recipe>-fewshot-<timestamp>); an existing one resumes")
    p.add_argument("--feature-cache", metavar="DIR",
                   help="linear mode: feature cache (default $BIT_TRANSFER_HOME/features, "
                        "else ~/.cache/bit-transfer/features)")
    p.add_argument("--quiet", action="store_true", help="no progress bars; a line per log step")
    p.set_defaults(func=cmd_fewshot)
    return p


def cmd_fewshot(args) -> int:
    from bit_transfer.config import recipe as recipes
    from bit_transfer.commands.fewshot.sweep import sweep

    shots = parse_ints(args.shots, "--shots", minimum=1)
    seeds = parse_ints(args.seeds, "--seeds", minimum=0)
    r = recipes.load(args.recipe, args.sets)
    result = sweep(r, shots, seeds, mode=args.mode, sweep_dir=args.run_dir, quiet=args.quiet or None,
                   feature_root=args.feature_cache)
    return 0 if result.complete else 130


def _device_name(text: str) -> str:
    """--device in any case: cpu -> CPU, ascend -> Ascend."""
    return {"auto": "auto", "cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}.get(text.lower(), text)


def _add_image_args(p: argparse.ArgumentParser) -> None:
    """How predict and embed read images and run the model."""
    p.add_argument("--batch-size", type=int_at_least(1), metavar="N",
                   help="images per forward pass (default: the checkpoint's micro-batch, else 32)")
    p.add_argument("--image-size", type=int_at_least(1), metavar="PX",
                   help="square input size (default: the resolution the run was trained at, else 128)")
    p.add_argument("--device", type=_device_name, choices=["auto", "CPU", "GPU", "Ascend"], default="auto")
    p.add_argument("--workers", type=int_at_least(1), metavar="N", help="decoding threads (default: the CPUs per rank)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable or non-image file (exit 2) instead of naming and skipping it")


def add_predict_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict",
        help="top-k classes of images with a run, .ckpt, Hugging Face model, BiT .npz or exported .onnx",
        description="Predict the classes of images, preprocessed exactly as eval does. Images in class "
                    "folders named like the model's classes (the image-folder layout) are labelled: top-1/top-5 "
                    "are printed and metrics.json and the confusion matrix written as eval writes them.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="a run directory (its latest checkpoint), a .ckpt, a Hugging Face directory or hf:org/name, "
                        "an official BiT .npz, or an .onnx from export")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files, directories (recursive, sorted), glob patterns, or - for paths on stdin")
    p.add_argument("--recipe", metavar="RECIPE", help="predict the recipe's eval split instead of INPUTs (labelled)")
    p.add_argument("--top-k", type=int_at_least(1), default=5, metavar="K", help="classes per image (default 5)")
    p.add_argument("--out", metavar="FILE",
                   help="write the predictions to a .csv (path,pred,prob,topk) or .jsonl file instead of the table; "
                        "an existing file is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    p.add_argument("--report", metavar="DIR",
                   help="labelled images: where metrics.json and the confusion matrix go (default: "
                        "<run>/evals/<checkpoint>-predict-<folder>/ for a run's checkpoint, else runs/predict-<folder>-<time>)")
    _add_image_args(p)
    p.add_argument("--quiet", action="store_true", help="no table and no progress bar: the summary only")
    p.set_defaults(func=cmd_predict)
    return p


def cmd_predict(args) -> int:
    from bit_transfer.commands.predict import predict_command

    return predict_command(args)


def add_embed_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "embed",
        help="pre-logit features of images (.npz, .parquet or .npy) for your own classifier, search or plots",
        description="Compute the pre-logit features (what a linear probe trains on) of images, preprocessed "
                    "exactly as eval does, with the folded inference model. Images in class folders get their "
                    "folder's name as label.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="a run directory (its latest checkpoint), a .ckpt, a Hugging Face directory or hf:org/name, "
                        "or an official BiT .npz")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, directories (recursive, sorted), glob patterns, or - for paths on stdin")
    p.add_argument("--out", required=True, metavar="FILE",
                   help=".npz (features, paths, labels), .parquet (path, label, features) or .npy (the matrix); "
                        "an existing file is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    _add_image_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_embed)
    return p


def cmd_embed(args) -> int:
    from bit_transfer.commands.embed import embed_command

    return embed_command(args)


def add_doctor_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "doctor",
        help="check this machine: MindSpore build, devices, CUDA/CANN, CPU kernels, a training smoke run",
        description="Report MindSpore's version and build, the devices it sees (or why none), CUDA/CANN versions, "
                    "our CPU kernels, then train R50x1 (random weights) for a few steps on the device in each "
                    "precision it supports. With RECIPE: the input pipeline's images/s on its data and whether "
                    "training it would be input-bound. Exit 1 if a smoke run failed.",
    )
    add_recipe_args(p, optional=True)
    p.add_argument("--device", type=_device_name, choices=["auto", "CPU", "GPU", "Ascend"], default=None,
                   help="device of the smoke run (default: the recipe's train.device, else auto)")
    p.add_argument("--steps", type=int_at_least(2), default=20, metavar="N", help="smoke-run steps (default 20)")
    p.add_argument("--image-size", type=int_at_least(32), default=64, metavar="PX", help="smoke-run images (default 64)")
    p.add_argument("--batch", type=int_at_least(1), default=4, metavar="N", help="smoke-run micro-batch (default 4)")
    p.add_argument("--seconds", type=float, default=10.0, metavar="S",
                   help="stop a precision's smoke run after this long past its first step (default 10)")
    p.add_argument("--model", default="BiT-M-R50x1", metavar="NAME",
                   help="smoke-run model: a BiT name (default BiT-M-R50x1) or tiny (a 1/8-width test model)")
    p.set_defaults(func=cmd_doctor)
    return p


def cmd_doctor(args) -> int:
    from bit_transfer.commands import doctor

    return doctor.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="bit-transfer",
        description="Fine-tune Big Transfer (BiT) models with the BiT-HyperRule on MindSpore.",
    )
    parser.add_argument("--version", action="version", version=f"bit-transfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True

    p = sub.add_parser("plan", help="print the BiT-HyperRule plan for a recipe (no training)")
    add_recipe_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_device_args(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("fit", help="fine-tune with the BiT-HyperRule, evaluate, checkpoint (resumable)")
    add_recipe_args(p, optional=True)  # optional with --resume RUN_DIR
    p.add_argument("--run-dir", help="run directory (default runs/<recipe>-<timestamp>); an existing one resumes")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar; a line per log step")
    p.add_argument("--stop-after", type=int_at_least(1), metavar="N",
                   help="stop after step N of the plan as if interrupted (rerun to continue)")
    _add_device_args(p, launch=True)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the recipe's eval split")
    add_recipe_args(p)
    p.add_argument("--checkpoint", required=True, help="a .ckpt file or a run directory (its latest checkpoint)")
    p.add_argument("--out", help="where to write metrics.json and the confusion matrix (default: <run>/evals/<checkpoint>-<recipe>/, its own directory)")
    p.set_defaults(func=cmd_eval)

    add_fewshot_parser(sub)

    p = sub.add_parser("export", help="export a run's latest checkpoint, a .ckpt or pretrained weights to "
                                      "Hugging Face, MindIR or ONNX")
    p.add_argument("run_or_ckpt", metavar="MODEL",
                   help="a run directory (its latest checkpoints/*.ckpt) or a .ckpt file; or pretrained weights "
                        "to convert: a Hugging Face directory, hf:org/name, an official BiT .npz")
    p.add_argument("--format", choices=["hf", "mindir", "onnx"], required=True,
                   help="hf: transformers' BitForImageClassification; mindir: MindSpore Lite, fixed input size; "
                        "onnx: ONNX Runtime, any batch and size, needs pip install 'bit-transfer[deploy]'")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--image-size", type=int_at_least(1), default=None,
                   help="the resolution the model expects: MindIR's input size, ONNX's metadata (default: the "
                        "run's plan.json crop, or the weights' preprocessor_config.json)")
    p.set_defaults(func=cmd_export)

    add_predict_parser(sub)
    add_embed_parser(sub)
    add_doctor_parser(sub)
    return parser


# The option each command's output place is chosen with, for the fix a storage error names.
PLACE_OPTIONS = {"fit": "--run-dir", "fewshot": "--run-dir", "eval": "--out", "export": "--out", "predict": "--out"}
# Commands that stop on a signal at their own checks (a StopFlag), leaving a resumable run.
GRACEFUL = ("fit", "fewshot")


def main(argv: list[str] | None = None) -> None:
    """The command line (`argv` None) or, from another program, the command `argv`; exits either way."""
    handlers = signals.listen_early()  # first: a signal at any moment is one line and exit 130, no traceback
    try:
        code = _main(argv)
    finally:
        if argv is not None:  # called inside another program (tests): its handlers and its place option back
            signals.restore(handlers)
            PLACE_OPTION.set(None)
    if argv is None:
        _exit(code)
    sys.exit(code)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    PLACE_OPTION.set(PLACE_OPTIONS.get(args.command))
    try:
        versions.check_numpy()  # before any command imports MindSpore, which would crash on it
        if args.command not in GRACEFUL:
            signals.stop_at_once()
        code = args.func(args)
        if signals.PENDING and code == 0:  # after the command's own stop had finished listening
            raise Interrupted(f"{signals.pending_name()} as {args.command} was ending; its work is complete")
    except UsageError as e:
        print(f"bit-transfer {args.command}: {getattr(e, 'label', 'error')}: {e}", file=sys.stderr)
        code = e.exit_code
    except BrokenPipeError:  # `bit-transfer plan ... | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except KeyboardInterrupt:
        code = _interrupted(args.command)
    except Exception:
        if not signals.PENDING:
            raise  # a bug: its traceback
        code = _interrupted(args.command)  # what the signal became where it landed (an import cut short)
    return code


def _interrupted(command: str) -> int:
    name = signals.pending_name() or "a signal"
    print(f"bit-transfer {command}: interrupted: {name}; stopped before the end; rerun the same command",
          file=sys.stderr)
    return 130


def _exit(code: int) -> None:
    """Exit the command line; after a signal, without the interpreter's shutdown, which MindSpore's
    threads, started or cut short by the signal, can abort (exit 134): every file was closed before here."""
    if code == 130 and "mindspore" in sys.modules:
        import os

        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)
