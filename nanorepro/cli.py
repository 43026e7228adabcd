"""`nanorepro <command>`: thin argument parsing over the modules, imported lazily.

Every command that fails on bad input prints one line, `nanorepro: error: ... (fix: ...)`, and
exits with 2; `--debug` shows the traceback instead. Light commands (report, plots, reserve)
never import torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import UserError


def _prepare(args: argparse.Namespace, extra: list[str]) -> None:
    from . import data

    encodings = ("char", "gpt2") if args.encoding == "all" else (args.encoding,)
    for meta in data.prepare(input_path=args.input, name=args.name, encodings=encodings,
                             data_root=args.data_root, cache_dir=args.cache_dir):
        print(data.summary(meta))


def _train(args: argparse.Namespace, extra: list[str]) -> None:
    from . import config, train

    overrides = config.parse_overrides(extra)
    if args.out_dir:
        overrides["out_dir"] = args.out_dir
    cfg = config.resolve(args.preset, overrides)
    if args.seeds > 1:
        train.train_seeds(cfg, args.seeds, preset=args.preset)
    else:
        train.train(cfg, preset=args.preset)


def _sample(args: argparse.Namespace, extra: list[str]) -> None:
    from . import sample

    if extra:
        raise UserError(f"unknown arguments {' '.join(extra)}", "see `nanorepro sample --help`")
    prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
    texts = sample.sample(run_dir=args.run, model=args.model, prompt=prompt, num_samples=args.num_samples,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          seed=args.seed, device=args.device, data_root=args.data_root)
    out = "\n---------------\n".join(texts)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(out + "\n", encoding="utf-8")
        print(f"wrote {len(texts)} sample(s) to {args.out}")
    else:
        print(out)


def _run_notebooks(args: argparse.Namespace, extra: list[str]) -> None:
    from . import notebooks

    params = notebooks.parse_params(args.param, args.params_file)
    notebooks.run_notebooks(params, only=args.only)


def _report(args: argparse.Namespace, extra: list[str]) -> None:
    from . import report

    rep = report.report([Path(r) for r in args.runs], Path(args.out) if args.out else None)
    print(report.claims_table(rep["claims"], compact=True))
    print(f"\nwrote {Path(rep['out_dir']) / 'REPORT.md'} and report.json")


def _bundle(args: argparse.Namespace, extra: list[str]) -> None:
    from . import report

    path = report.bundle([Path(r) for r in args.runs], Path(args.out) if args.out else None,
                         include_checkpoints=args.with_checkpoints)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


# -- reserve / release (Chameleon; added by the Chameleon helper) --------------------------------
def _reserve(args: argparse.Namespace, extra: list[str]) -> None:
    from . import chameleon

    chameleon.reserve("chameleon", site=args.site, node_type=args.node_type, lease_hours=args.hours,
                      image=args.image, lease_name=args.lease_name, server_name=args.server_name,
                      state_dir=args.results_dir, project=args.project, keep_on_failure=args.keep_on_failure)
    if not args.no_setup:
        chameleon.setup_node("chameleon", args.results_dir)


def _release(args: argparse.Namespace, extra: list[str]) -> None:
    from . import chameleon

    chameleon.release("chameleon", state_dir=args.results_dir, site=args.site, lease_name=args.lease_name,
                      server_name=args.server_name, project=args.project)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanorepro", allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"nanorepro {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", allow_abbrev=False, help="download Tiny Shakespeare (or read --input) and write token files")
    s.add_argument("--input", help="a local UTF-8 text file instead of the download (or $NANOREPRO_INPUT)")
    s.add_argument("--name", default="shakespeare", help="dataset name; folders are <data-root>/<name>_<encoding>")
    s.add_argument("--encoding", default="all", help="char, gpt2 or all")
    s.add_argument("--data-root", default="data")
    s.add_argument("--cache-dir", default=None, help="download cache (default ~/.cache/nanorepro or $NANOREPRO_CACHE)")
    s.set_defaults(func=_prepare)

    from .config import PRESETS

    s = sub.add_parser("train", allow_abbrev=False, help="train or fine-tune; any config field as --field=value",
                       epilog="Override any field with --field=value; list them with --help-fields.")
    s.add_argument("--preset", default=None, help=f"one of: {', '.join(PRESETS)}")
    s.add_argument("--out-dir", default=None, help="run folder (resumed if it holds a checkpoint)")
    s.add_argument("--seeds", type=int, default=1, help="run N seeds (seed, seed+1, ...) into <out-dir>/seed-<s>")
    s.add_argument("--help-fields", action="store_true", help="list every config field and exit")
    s.set_defaults(func=_train)

    s = sub.add_parser("sample", allow_abbrev=False, help="generate text from a run folder or a pretrained GPT-2")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run folder with ckpt.pt")
    src.add_argument("--model", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl or a local Hugging Face folder")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--prompt-file", default=None)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--max-new-tokens", type=int, default=500)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=200)
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--device", default="auto")
    s.add_argument("--data-root", default=None, help="where the run's dataset lives (default: the run's config)")
    s.add_argument("--out", default=None, help="also write the samples to this file")
    s.set_defaults(func=_sample)

    s = sub.add_parser("run-notebooks", allow_abbrev=False, help="run notebooks/ in order with papermill (the main job)")
    s.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="a notebook parameter, e.g. -p char_max_iters 200 (repeatable)")
    s.add_argument("-f", "--params-file", default=None, help="YAML or JSON file of notebook parameters")
    s.add_argument("--only", nargs="*", default=None, help="run only notebooks whose names start with these")
    s.set_defaults(func=_run_notebooks)

    s = sub.add_parser("report", allow_abbrev=False, help="judge runs against the published numbers: REPORT.md, report.json, plots")
    s.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs/<run>)")
    s.add_argument("--out", default=None, help="where to write the report (default: the runs' common parent)")
    s.set_defaults(func=_report)

    s = sub.add_parser("bundle", allow_abbrev=False, help="pack report, metrics, plots, samples, configs and notebooks in a .tar.gz")
    s.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs/<run>)")
    s.add_argument("--out", default=None, help="the .tar.gz to write (default: <common parent>/<name>-bundle.tar.gz)")
    s.add_argument("--with-checkpoints", action="store_true", help="also pack each run's ckpt.pt (large)")
    s.set_defaults(func=_bundle)

    s = sub.add_parser("reserve", allow_abbrev=False, help="lease an A100 node on Chameleon, boot it, install nanorepro (see 00_reserve_node)")
    s.add_argument("--results-dir", default="results/chameleon", help="where the node record goes")
    s.add_argument("--site", default=None, help="CHI@UC or CHI@TACC (default $OS_REGION_NAME)")
    s.add_argument("--node-type", default="auto", help="auto, compute_gigaio, gpu_a100_pcie or compute_liqid")
    s.add_argument("--hours", type=float, default=4, help="lease length; it costs SUs until released")
    s.add_argument("--image", default="CC-Ubuntu22.04-CUDA")
    s.add_argument("--lease-name", default=None, help="default nanorepro-<user>; a live lease of this name is reused")
    s.add_argument("--server-name", default=None, help="default <lease-name>-node")
    s.add_argument("--project", default=None, help="default $OS_PROJECT_NAME")
    s.add_argument("--keep-on-failure", action="store_true", help="keep the lease when a later step fails")
    s.add_argument("--no-setup", action="store_true", help="do not install nanorepro on the node")
    s.set_defaults(func=_reserve)

    s = sub.add_parser("release", allow_abbrev=False, help="delete the Chameleon server, floating IP and lease (see 05_release_node)")
    s.add_argument("--results-dir", default="results/chameleon", help="the folder holding the node record")
    s.add_argument("--site", default=None, help="default: the recorded site")
    s.add_argument("--lease-name", default=None, help="release this lease (and its server) even without a record")
    s.add_argument("--server-name", default=None)
    s.add_argument("--project", default=None)
    s.set_defaults(func=_release)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "help_fields", False):
        from .config import describe_fields

        print(describe_fields())
        return 0
    if extra and args.command not in ("train",):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args, extra)
    except UserError as e:
        if args.debug or os.environ.get("NANOREPRO_DEBUG"):
            raise
        print(f"nanorepro: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("nanorepro: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
