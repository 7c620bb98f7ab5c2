"""`raydistill data list` / `raydistill data show NAME`."""

from __future__ import annotations

import argparse
import json

from raydistill.data.loaders import bundled_sets, load_file, resolve_set


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_cmd", required=True)
    sub.add_parser("list", help="bundled sets with counts")
    show = sub.add_parser("show", help="print records of a set")
    show.add_argument("name")
    show.add_argument("--n", type=int, default=3)
    show.add_argument("--json", action="store_true")


def main(cfg, args: argparse.Namespace) -> int:
    if args.data_cmd == "list":
        print(f"{'name':<22}{'split':<7}{'domain':<7}{'records':>8}{'skipped':>9}")
        for name, path in bundled_sets().items():
            res = load_file(path)
            dom = res.records[0].domain if res.records else "?"
            print(f"{name:<22}{path.parent.name:<7}{dom:<7}{len(res.records):>8}{len(res.skipped):>9}")
        return 0
    res = load_file(resolve_set(args.name))
    for r in res.records[: args.n]:
        if args.json:
            print(json.dumps(r.to_dict(), ensure_ascii=False))
        else:
            print(f"[{r.id}] ({r.domain}) {r.question}\n  answer: {r.answer}\n")
    return 0
