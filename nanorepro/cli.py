"""`nanorepro <command>`: thin argument parsing over the modules.

Every command that fails on bad input prints one line, `nanorepro: error: ... (fix: ...)`, and
exits with the error's code (2 for bad input); `--debug` shows the traceback instead. Modules that
need torch (train, sample, bench) are imported by their commands only, so light commands (report,
reserve, estimate, run-notebooks) never import it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from nanorepro import __version__, compare, config, fmt, memory, notebooks
from nanorepro.cloud import chameleon
from nanorepro.config import PRESETS, PRETRAINED
from nanorepro.data import dataset, openwebtext
from nanorepro.errors import UserError
from nanorepro.files import write_text_atomic
from nanorepro.results import report


def _prepare(args: argparse.Namespace, extra: list[str]) -> None:
    if args.dataset == "openwebtext":
        meta = openwebtext.prepare(args.source or openwebtext.DEFAULT_SOURCE, name=args.name or "openwebtext",
                                   data_root=args.data_root, num_proc=args.num_proc, text_column=args.text_column)
        print(dataset.summary(meta))
        return
    if args.source or args.num_proc:
        raise UserError("--source and --num-proc are for --dataset openwebtext", "use --input FILE for a text file")
    encodings = ("char", "gpt2") if args.encoding == "all" else (args.encoding,)
    for meta in dataset.prepare(input_path=args.input, name=args.name or "shakespeare", encodings=encodings,
                             data_root=args.data_root, cache_dir=args.cache_dir, url=args.url):
        print(dataset.summary(meta))


def _compare_gpt2(args: argparse.Namespace, extra: list[str]) -> None:
    overrides = {} if args.device is None else {"device": args.device}
    out = compare.run(args.models, preset=args.preset, results_dir=args.results_dir, target=args.target,
                      max_iters=args.max_iters, input_path=args.input, overrides=overrides)
    print(out["table"])
    print(f"\nwrote {Path(args.results_dir) / compare.TABLE_FILE}, {compare.JSON_FILE} and {', '.join(out['figures'])}")


def _estimate(args: argparse.Namespace, extra: list[str]) -> None:
    """Memory per process, then (with --gpu) time, tokens/s and, on several nodes or GPUs, the Chameleon SUs.
    A run on more than one GPU in all is torchrun's: parallel=none is estimated as ddp, as nanoGPT runs it."""
    for option, value in (("--nodes", args.nodes), ("--gpus", args.gpus)):
        if value < 1:
            raise UserError(f"{option} {value} is not a positive number", f"give {option} 1 or more")
    overrides = config.parse_overrides(extra)
    cfg = config.resolve(args.preset, overrides)
    world = args.nodes * args.gpus
    if world > 1 and cfg.parallel == "none":
        cfg = config.resolve(args.preset, {**overrides, "parallel": "ddp"})
        print(f"parallel=none: estimated as parallel=ddp over {world} processes (torchrun; --parallel=fsdp to shard)")
    vocab, source = dataset.vocab_size_of(cfg.data_root, cfg.dataset)
    shape = cfg.model_config(vocab)
    dtype, why = (cfg.dtype, f"dtype {cfg.dtype}") if cfg.dtype not in ("auto", "fast") else memory.dtype_for(
        args.gpu, args.preset in config.GPU_PRESETS or bool(args.gpu_memory_gib))
    est = memory.estimate_for(cfg, shape, dtype, world)
    print(f"vocabulary {vocab:,} ({source}); {why}")
    print(f"{shape.non_embedding_params / 1e6:.2f}M parameters (as nanoGPT and `train` count them: no position "
          f"embeddings), {cfg.tokens_per_iter:,} tokens/iter; per process {est.describe()}")
    if args.gpu_memory_gib:
        memory.check(cfg, shape, dtype, int(args.gpu_memory_gib * 2**30), f"a {args.gpu_memory_gib:g} GiB GPU",
                     world, args.gpus)
        print(f"fits in {args.gpu_memory_gib:g} GiB")
    secs = memory.estimate_seconds(cfg, shape, args.gpu, world, dtype, nodes=args.nodes)
    if secs is None:
        return
    spread = "" if args.nodes == 1 else (f" ({args.nodes} nodes x {args.gpus}; {memory.INTER_NODE_EFFICIENCY:.0%} "
                                         "of the one-node rate per GPU assumed across nodes)")
    print(f"time: ~{fmt.duration(secs)} at {memory.ASSUMED_MFU:.0%} MFU on {world}x {args.gpu}{spread}")
    if not cfg.eval_only:
        tokens = cfg.max_iters * cfg.tokens_per_iter
        print(f"throughput: ~{tokens / secs:,.0f} tokens/s; {cfg.max_iters:,} iters x {cfg.tokens_per_iter:,} tokens = "
              f"{tokens / 1e9:.1f}B tokens in {secs / 86400:.2f} days")
    hours = secs / 3600
    nodes = "1 node" if args.nodes == 1 else f"{args.nodes} nodes"
    node_type = "compute_gigaio" if args.gpus == 1 else "gpu_a100_pcie"  # one A100, or four
    rate, source = chameleon.su_rate(node_type)
    su = chameleon.su_cost(hours, args.nodes, node_type)
    print(f"Chameleon: ~{su:,.0f} SU" if su >= 10 else f"Chameleon: ~{su:.2g} SU",
          f"({hours:,.1f} h x {nodes} x {rate:g} SU per node-hour: {source}; the run alone: boot and install add "
          "about an hour)")
    if hours > chameleon.MAX_LEASE_HOURS:
        print(f"   longer than one lease ({chameleon.MAX_LEASE_HOURS // 24} days at most): reserve again when it "
              "ends, and the train stage resumes from the last checkpoint")


def _train(args: argparse.Namespace, extra: list[str]) -> None:
    from nanorepro.gpt import train

    if args.config:  # resolved and checked where the stage was launched (pipeline.Pipeline.train)
        if args.preset or args.out_dir or extra:
            raise UserError("--config is a whole run's config: --preset, --out-dir and --field=value do not apply",
                            "change the config file, or drop --config and give --preset and overrides")
        cfg = config.Config.load(args.config)
    else:
        overrides = config.parse_overrides(extra)
        if args.out_dir:
            overrides["out_dir"] = args.out_dir
        cfg = config.resolve(args.preset, overrides)
    if args.seeds != 1:  # train_seeds refuses 0 and negatives
        train.train_seeds(cfg, args.seeds, preset=cfg.preset)
    else:
        train.train(cfg, preset=cfg.preset)


def _read_text(path: str, option: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read {option} {path}: {e.strerror}", f"give {option} an existing text file") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{option} {path} is not UTF-8 text (byte {e.start}: {e.reason})",
                        "convert it to UTF-8, e.g. `iconv -t UTF-8 in.txt > out.txt`") from e


def _sample(args: argparse.Namespace, extra: list[str]) -> None:
    from nanorepro.gpt import sample

    prompt = _read_text(args.prompt_file, "--prompt-file") if args.prompt_file else args.prompt
    texts = sample.sample(run_dir=args.run, model=args.model, prompt=prompt, num_samples=args.num_samples,
                          max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          seed=args.seed, device=args.device, data_root=args.data_root)
    out = "\n---------------\n".join(texts)
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(args.out), out + "\n")
        except OSError as e:
            raise UserError(f"cannot write {args.out}: {e.strerror}", "pass --out a path in a writable folder") from e
        print(f"wrote {len(texts)} sample(s) to {args.out}")
    else:
        print(out)


def _run_notebooks(args: argparse.Namespace, extra: list[str]) -> None:
    notebooks.run_notebooks(notebooks.parse_params(args.param, args.params_file), only=args.only)


def _report(args: argparse.Namespace, extra: list[str]) -> None:
    rep = report.report(args.runs, args.out)
    print(report.claims_table(rep["claims"], compact=True))
    print(f"\nwrote {Path(rep['out_dir']) / 'REPORT.md'} and report.json")


def _bundle(args: argparse.Namespace, extra: list[str]) -> None:
    path = report.bundle(args.runs, args.out, include_checkpoints=args.with_checkpoints)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def _reserve(args: argparse.Namespace, extra: list[str]) -> None:
    chameleon.reserve("chameleon", site=args.site, node_type=args.node_type, nodes=args.nodes, lease_hours=args.hours,
                      image=args.image, lease_name=args.lease_name, server_name=args.server_name,
                      state_dir=args.results_dir, project=args.project, keep_on_failure=args.keep_on_failure,
                      start=args.start)
    if not args.no_setup:
        chameleon.setup_node("chameleon", args.results_dir)


def _release(args: argparse.Namespace, extra: list[str]) -> None:
    chameleon.release("chameleon", state_dir=args.results_dir, site=args.site, lease_name=args.lease_name,
                      server_name=args.server_name, project=args.project)


def _bench(args: argparse.Namespace, extra: list[str]) -> None:
    from nanorepro.gpt import bench

    overrides = config.parse_overrides(extra)
    if args.device:
        overrides["device"] = config.coerce("device", args.device)
    bench.bench(preset=args.preset, overrides=overrides, iters=args.iters, warmup=args.warmup,
                target_loss=args.target_loss, out=args.out, nanogpt=args.nanogpt,
                nanogpt_preset=args.nanogpt_preset, pairs=args.pairs, input_path=args.input, keep=args.keep)


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviated options, its usage errors the same one line as every other error (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"nanorepro: error: {message} (fix: see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options, in the order `nanorepro --help` lists them; each group's options read
    in one place below."""
    p = _Parser(prog="nanorepro", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"nanorepro {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_data_and_training_commands, _results_commands, _chameleon_commands, _scaling_commands):
        add(sub)
    return p


def _data_and_training_commands(sub: argparse._SubParsersAction) -> None:
    """prepare, train, sample."""
    s = sub.add_parser("prepare", help="Tiny Shakespeare (bundled, or --input) into token files")
    s.add_argument("--input", help="a local UTF-8 text file instead of Tiny Shakespeare (or $NANOREPRO_INPUT)")
    s.add_argument("--url", help="download Tiny Shakespeare from this mirror (sha256-checked, cached) "
                   "instead of using the bundled copy")
    s.add_argument("--dataset", default="shakespeare", choices=("shakespeare", "openwebtext"),
                   help="openwebtext: GPT-2 BPE of a Hugging Face text dataset (default Skylion007/openwebtext)")
    s.add_argument("--source", help="openwebtext only: a local copy (save_to_disk folder, "
                   ".parquet/.jsonl files) or a Hugging Face dataset name")
    s.add_argument("--num-proc", type=int, help="openwebtext only: tokenising processes (default: all cores)")
    s.add_argument("--text-column", default="text", help="openwebtext only: the column holding the documents")
    s.add_argument("--name", help="dataset name (default shakespeare / openwebtext); "
                   "folders are <data-root>/<name>_<encoding>")
    s.add_argument("--encoding", default="all", help="char, gpt2 or all")
    s.add_argument("--data-root", default="data")
    s.add_argument("--cache-dir", help="download cache (default ~/.cache/nanorepro or $NANOREPRO_CACHE)")
    s.set_defaults(func=_prepare)

    s = sub.add_parser("train", help="train or fine-tune; any config field as --field=value",
                       epilog="Override any field with --field=value; list them with --help-fields.")
    s.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    s.add_argument("--out-dir", help="run folder (resumed if it holds a checkpoint)")
    s.add_argument("--config", metavar="FILE",
                   help="a run's config.json, already resolved (what notebooks launch); no preset or overrides")
    s.add_argument("--seeds", type=int, default=1, help="run N seeds (seed, seed+1, ...) into <out-dir>/seed-<s>")
    s.add_argument("--help-fields", action="store_true", help="list every config field and exit")
    s.set_defaults(func=_train)

    s = sub.add_parser("sample", help="generate text from a run folder or a pretrained GPT-2")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run folder with ckpt.pt")
    src.add_argument("--model", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl or a local Hugging Face folder")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--prompt-file")
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--max-new-tokens", type=int, default=500)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=200)
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--device", default="auto")
    s.add_argument("--data-root", help="where the run's dataset lives (default: the run's config)")
    s.add_argument("--out", help="also write the samples to this file")
    s.set_defaults(func=_sample)



def _results_commands(sub: argparse._SubParsersAction) -> None:
    """run-notebooks (the main job), report, bundle."""
    s = sub.add_parser("run-notebooks", help="run notebooks/ in order with papermill (the main job)")
    s.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="a notebook parameter, e.g. -p char_max_iters 200 (repeatable)")
    s.add_argument("-f", "--params-file", help="YAML or JSON file of notebook parameters")
    s.add_argument("--only", nargs="*", help="run only notebooks whose names start with these")
    s.set_defaults(func=_run_notebooks)

    s = sub.add_parser("report", help="judge runs against the published numbers: REPORT.md, report.json, plots")
    s.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs/<run>)")
    s.add_argument("--out", help="where to write the report (default: the runs' common parent)")
    s.set_defaults(func=_report)

    s = sub.add_parser("bundle", help="pack report, metrics, plots, samples, configs and notebooks in a .tar.gz")
    s.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs/<run>)")
    s.add_argument("--out", help="the .tar.gz to write (default: <common parent>/<name>-bundle.tar.gz)")
    s.add_argument("--with-checkpoints", action="store_true", help="also pack each run's ckpt.pt (large)")
    s.set_defaults(func=_bundle)



def _chameleon_commands(sub: argparse._SubParsersAction) -> None:
    """reserve and release a Chameleon node."""
    s = sub.add_parser("reserve", help="lease an A100 node on Chameleon, boot it, install nanorepro (see 00_reserve_node)")
    s.add_argument("--results-dir", default=chameleon.STATE_DIR, help="where the node record goes")
    s.add_argument("--site", help="CHI@UC or CHI@TACC (default $OS_REGION_NAME)")
    s.add_argument("--node-type", default="auto", help="auto, compute_gigaio, gpu_a100_pcie or compute_liqid")
    s.add_argument("--nodes", type=int, default=1, help="nodes of that type in the one lease (default 1); "
                   "only the first gets a floating IP")
    s.add_argument("--hours", type=float, default=chameleon.DEFAULT_LEASE_HOURS,
                   help="lease length (default %(default)s); it costs SUs until released")
    s.add_argument("--image", default=chameleon.DEFAULT_IMAGE)
    s.add_argument("--lease-name", help="default nanorepro-<user>; a live lease of this name is reused")
    s.add_argument("--server-name", help="servers are <server-name>-0, -1, ... (default <lease-name>-0, ...)")
    s.add_argument("--project", help="default $OS_PROJECT_NAME")
    s.add_argument("--keep-on-failure", action="store_true", help="keep the lease when a later step fails")
    s.add_argument("--start", default="now", help="now (default), next_free (the earliest window with free nodes: "
                   "booked, run it again after its start), or an ISO time in UTC")
    s.add_argument("--no-setup", action="store_true", help="do not install nanorepro on the node")
    s.set_defaults(func=_reserve)

    s = sub.add_parser("release", help="delete the Chameleon servers, floating IP and lease, and check none is left "
                       "(see 05_release_node)")
    s.add_argument("--results-dir", default=chameleon.STATE_DIR, help="the folder holding the node record")
    s.add_argument("--site", help="default: the recorded site")
    s.add_argument("--lease-name", help="release this lease (and its servers <lease-name>-N) even without a record")
    s.add_argument("--server-name", help="a server name (or prefix of <name>-N) to delete as well")
    s.add_argument("--project")
    s.set_defaults(func=_release)



def _scaling_commands(sub: argparse._SubParsersAction) -> None:
    """Scaling out: GPT-2 sizes, memory, speed."""
    s = sub.add_parser("compare-gpt2",
                       help="fine-tune several GPT-2 sizes with one recipe: a table and overlaid loss curves")
    s.add_argument("--models", nargs="+", default=list(PRETRAINED),
                   help="GPT-2 names or local Hugging Face folders (default: all four sizes)")
    s.add_argument("--preset", default=compare.DEFAULT_PRESET, help="the recipe every model gets")
    s.add_argument("--results-dir", default="results/compare")
    s.add_argument("--target", default="local", help="local or chameleon (a node reserved into --results-dir)")
    s.add_argument("--max-iters", type=int)
    s.add_argument("--device", help="override the preset's device (e.g. cpu)")
    s.add_argument("--input", help="a local Tiny Shakespeare instead of the download")
    s.set_defaults(func=_compare_gpt2)

    s = sub.add_parser("estimate", help="memory and time a run needs (no torch): --preset P [--field=value ...]",
                       epilog="Override any config field with --field=value, as for train.")
    s.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    s.add_argument("--gpus", type=int, default=1,
                   help="GPUs (processes) per node; more than one in all runs under torchrun (parallel=none: ddp)")
    s.add_argument("--nodes", type=int, default=1,
                   help="nodes of --gpus GPUs each (Chameleon: reserve with nodes=N); adds the lease's SUs")
    s.add_argument("--gpu", help="GPU name for the time estimate, e.g. A100")
    s.add_argument("--gpu-memory-gib", type=float, help="refuse (exit 4) when it does not fit this")
    s.set_defaults(func=_estimate)

    s = sub.add_parser("bench", help="ms/iter, tokens/s, MFU, memory, time to a target loss; "
                       "optionally side by side with an upstream nanoGPT checkout",
                       epilog="Override any config field with --field=value (applied to both sides).")
    s.add_argument("--preset", help=f"one of: {', '.join(PRESETS)}")
    s.add_argument("--device", help="auto, cpu, cuda, cuda:N (default: the preset's)")
    s.add_argument("--iters", type=int, default=50, help="timed iterations per run (without --target-loss)")
    s.add_argument("--warmup", type=int, default=10, help="iterations left out of the timing at the start")
    s.add_argument("--target-loss", type=float,
                   help="train the config as given until an evaluation reaches this val loss; report the wall time")
    s.add_argument("--out", help="the JSON record (default results/bench/<preset>-<time>.json)")
    s.add_argument("--nanogpt", metavar="PATH",
                   help="a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT): run it alternately")
    s.add_argument("--nanogpt-preset", help="nanoGPT runs this preset instead (e.g. shakespeare-char-cpu)")
    s.add_argument("--pairs", type=int, default=1, help="alternating (nanorepro, nanoGPT) pairs, or runs without --nanogpt")
    s.add_argument("--input", help="the input.txt the dataset was prepared from (for nanoGPT's prepare.py)")
    s.add_argument("--keep", action="store_true", help="keep the temp folder with the runs and logs")
    s.set_defaults(func=_bench)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "help_fields", False):
        print(config.describe_fields())
        return 0
    if extra and args.command not in ("train", "estimate", "bench"):
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
