"""The `bit-transfer` command: plan, fit, eval, fewshot, export.

Usage errors (bad recipe, missing data or weights) print one line and exit with code 2;
heavy imports (MindSpore) happen inside the subcommands that need them.
"""

from __future__ import annotations

import argparse
import json
import sys

from bit_transfer import __version__
from bit_transfer.errors import UsageError


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/cifar10.yaml")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, typed like YAML (repeatable): --set train.batch_split=8",
    )


def cmd_plan(args) -> int:
    from bit_transfer import planning, recipe

    r = recipe.load(args.recipe, args.sets)
    info = planning.task_info(r)
    plan = planning.make_plan(r, info)
    layout = planning.batch_layout(plan.batch_size, r.train.batch_split)
    if args.json:
        print(json.dumps(planning.plan_json(info, plan, layout), indent=2))
    else:
        print(planning.plan_report(r, info, plan, layout))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bit-transfer",
        description="Fine-tune Big Transfer (BiT) models with the BiT-HyperRule on MindSpore.",
    )
    parser.add_argument("--version", action="version", version=f"bit-transfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("plan", help="print the BiT-HyperRule plan for a recipe (no training)")
    _add_recipe_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except UsageError as e:
        print(f"bit-transfer {args.command}: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print(f"bit-transfer {args.command}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
