"""OpenWebText (or any text dataset in the same shape) as GPT-2 token files, as nanoGPT prepares it.

`prepare` writes `<data_root>/<name>_gpt2/{train.bin, val.bin, meta.json}` in data.py's layout: the
documents split 99.95% / 0.05% as nanoGPT's `train_test_split(test_size=0.0005, seed=2357)`, each
GPT-2-encoded with `<|endoftext|>` after it (for OpenWebText, 9,035,582,198 train tokens, ~17 GiB).

Resumable: documents are tokenised shard by shard (datasets' `map` over `num_proc` processes) into
`.parts/<split>/<i>.bin`, each skipped when present; the parts are then appended to `<split>.bin`
with the progress recorded after each, so an interruption loses at most one shard's work.
The source is a `save_to_disk` folder, local .parquet/.json(l)/.csv/.txt/.arrow files, or a Hugging
Face dataset name; documents are read from its `text` column.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from nanorepro import fmt
from nanorepro.data.dataset import GPT2_VOCAB_SIZE, check_name, complete_meta, gpt2_encoding, one_line
from nanorepro.errors import ModelUnavailable, UserError
from nanorepro.files import write_atomic, write_text_atomic

DEFAULT_SOURCE = "Skylion007/openwebtext"  # nanoGPT's "openwebtext"
VAL_FRACTION = 0.0005
SPLIT_SEED = 2357
SHARD_DOCS = 50_000  # documents per resumable shard (~55M tokens of OpenWebText, ~110 MB)
# GPT-2 BPE on English web text: OpenWebText's ~39.8 GB of text is 9.04B tokens, ~4.4 bytes each
BYTES_PER_TOKEN = 4.4
DISK_MARGIN = 1.1  # the estimate varies with the text; keep 10% spare
PARTS = ".parts"
LOADERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".arrow": "arrow"}


# ---------------------------------------------------------------------------------------------
# The source

def load_source(source: str, text_column: str = "text", num_proc: int | None = None):
    """The source's documents as one `datasets.Dataset` (its `train` split, or its only one)."""
    try:
        import datasets
        from datasets.exceptions import DatasetNotFoundError
    except ImportError as e:
        raise UserError("preparing OpenWebText needs the `datasets` library", "pip install 'nanorepro[train]'") from e
    path = Path(source).expanduser()
    if not path.exists() and (source.startswith((".", "~", "/")) or path.suffix in LOADERS):  # a path, not a Hub name
        raise UserError(f"{source} does not exist", "give an existing file or folder, or a Hugging Face dataset name")
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
        elif path.exists():
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in LOADERS)
            kinds = {LOADERS.get(p.suffix) for p in files}
            if not files or None in kinds or len(kinds) != 1:
                raise UserError(f"{path} is not a dataset this can read (found {len(files)} data file(s), "
                                f"types {sorted(k or '?' for k in kinds)})",
                                f"give a save_to_disk folder, or files of one type: {', '.join(LOADERS)}")
            ds = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], num_proc=num_proc)
        else:
            ds = datasets.load_dataset(source, num_proc=num_proc)
    except RuntimeError as e:  # e.g. a Hub dataset that still needs a loading script
        raise UserError(f"cannot load dataset {source}: {one_line(e)}",
                        "pass --source a local copy or a Hub dataset stored as Parquet/Arrow") from e
    except (OSError, DatasetNotFoundError) as e:  # ConnectionError is an OSError
        raise ModelUnavailable(f"dataset {source} is not available here: {one_line(e)}",
                               "connect to the network once (it is cached), or pass --source a local copy "
                               "(a save_to_disk folder or .parquet/.jsonl files)") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise UserError(f"dataset {source} has splits {list(ds)} and none is 'train'",
                            "give a dataset with one split (its documents), or a 'train' split")
    if text_column not in ds.column_names:
        raise UserError(f"dataset {source} has no column {text_column!r} (columns: {ds.column_names})",
                        "name the column holding the documents with --text-column")
    if len(ds) < 2:
        raise UserError(f"dataset {source} has {len(ds)} document(s)", "need at least 2 (train and val)")
    return ds


def _split(ds, work: Path) -> dict[str, Any]:
    """nanoGPT's split: 0.05% of the documents, shuffled with seed 2357, become val. The shuffled
    order is an index file in `work` (never next to the source, which may be read-only)."""
    parts = ds.train_test_split(test_size=VAL_FRACTION, seed=SPLIT_SEED, shuffle=True,
                                train_indices_cache_file_name=str(work / "train-indices.arrow"),
                                test_indices_cache_file_name=str(work / "val-indices.arrow"))
    return {"train": parts["train"], "val": parts["test"]}


# ---------------------------------------------------------------------------------------------
# Disk

def estimate_bytes(text_bytes: int, documents: int) -> int:
    """Size of train.bin + val.bin: 2 bytes per token, one `<|endoftext|>` per document."""
    return int(2 * (text_bytes / BYTES_PER_TOKEN + documents))


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_disk(out: Path, needed: int) -> str:
    """One line saying what is needed, or UserError when the disk holding the folder `out` lacks it
    (less what earlier attempts already wrote there: parts and partial bins)."""
    have = shutil.disk_usage(out).free
    want = int(needed * DISK_MARGIN) - sum(p.stat().st_size for p in out.rglob("*.bin*") if p.is_file())
    line = f"token files need ~{_size(needed)} ({needed / 2**30:.1f} GiB) in {out}; {_size(have)} free"
    if want > have:
        raise UserError(f"not enough disk: {line} (need {_size(want)} more, with a {DISK_MARGIN - 1:.0%} margin)",
                        "free space there, or pass --data-root on a bigger disk")
    return line


# ---------------------------------------------------------------------------------------------
# Tokenising

_ENC = None


def _tokenize(batch: dict[str, list], text_column: str) -> dict[str, list]:
    """A batch of documents -> uint16 GPT-2 ids, `<|endoftext|>` after each (runs in map's workers)."""
    global _ENC
    if _ENC is None:
        _ENC = gpt2_encoding()
    ids = _ENC.encode_ordinary_batch(batch[text_column], num_threads=1)  # the processes are the parallelism
    return {"ids": [np.array(d + [_ENC.eot_token], dtype=np.uint16) for d in ids]}


def _write_json(path: Path, value: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(value, indent=1) + "\n")


def _tokenize_shard(docs, path: Path, text_column: str, num_proc: int) -> int:
    """Tokenise one shard of documents into the part file `path`; its token count."""
    ids = docs.map(_tokenize, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
                   keep_in_memory=True, remove_columns=docs.column_names, fn_kwargs={"text_column": text_column})
    tokens = ids.data.column("ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    write_atomic(path, tokens.astype(np.uint16, copy=False).tofile)
    return len(tokens)


def _progress(parts: Path) -> dict[str, int]:
    """How far appending a split's parts got: the next part to append, and the bytes before it."""
    path = parts / "progress.json"
    return json.loads(path.read_text()) if path.is_file() else {"next": 0, "bytes": 0}


def _assemble(out: Path, split: str, n_parts: int) -> int:
    """Append the parts, in order, to `<split>.bin`; resumable (progress saved after each part,
    each part deleted once recorded, so the disk holds ~one copy). Its token count."""
    parts = out / PARTS / split
    partial, state = out / f"{split}.bin.partial", _progress(parts)
    with open(partial, "ab" if partial.exists() else "wb") as f:
        f.truncate(state["bytes"])  # drop whatever an interrupted append left past the last record
        f.seek(state["bytes"])
        for i in range(state["next"], n_parts):
            part = parts / f"{i:05d}.bin"
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 24)
            f.flush()
            os.fsync(f.fileno())
            state = {"next": i + 1, "bytes": f.tell()}
            _write_json(parts / "progress.json", state)
            part.unlink()
    os.replace(partial, out / f"{split}.bin")
    shutil.rmtree(parts)
    return state["bytes"] // 2


def _plan(ds, source: str, text_column: str, shard_docs: int) -> dict[str, Any]:
    """Everything that decides the token files: a resumed preparation must have the same."""
    val = math.ceil(VAL_FRACTION * len(ds))  # as train_test_split counts it
    sizes = {"train": len(ds) - val, "val": val}
    return {"source": source, "fingerprint": getattr(ds, "_fingerprint", None), "text_column": text_column,
            "documents": sizes, "val_fraction": VAL_FRACTION, "split_seed": SPLIT_SEED, "shard_docs": shard_docs,
            "shards": {s: max(1, math.ceil(n / shard_docs)) for s, n in sizes.items()}}


def prepare(source: str = DEFAULT_SOURCE, name: str = "openwebtext", data_root: str | Path = "data",
            num_proc: int | None = None, text_column: str = "text", shard_docs: int = SHARD_DOCS) -> dict[str, Any]:
    """Tokenise `source` into `<data_root>/<name>_gpt2/`; its meta (with `data_dir`). Re-running
    reuses a finished folder and resumes an interrupted one."""
    from tqdm import tqdm

    check_name(name)
    num_proc = max(1, num_proc or os.cpu_count() or 1)
    if shard_docs < 1:
        raise UserError(f"shard_docs must be >= 1, got {shard_docs}", "use e.g. 50000")
    out = Path(data_root) / f"{name}_gpt2"
    gpt2_encoding()  # here, once, rather than failing in every worker
    ds = load_source(source, text_column, num_proc)
    plan = _plan(ds, source, text_column, shard_docs)
    meta = complete_meta(out)
    if meta and meta.get("plan") == plan:
        print(f"reusing {out}: it already holds {source} ({meta['train_tokens']:,} train tokens)")
        return {**meta, "data_dir": str(out)}
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").unlink(missing_ok=True)  # incomplete from here until the end
        plan_path = out / PARTS / "plan.json"
        if not plan_path.is_file() or json.loads(plan_path.read_text()) != plan:
            # token files not made by an interrupted run of this very plan cannot be resumed
            made = [out / PARTS] + [out / f"{s}.bin{x}" for s in ("train", "val") for x in ("", ".partial")]
            stale = [p for p in made if p.exists()]
            if stale:
                print(f"{out} holds token files of another source or split: starting over")
            for p in stale:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        (out / PARTS).mkdir(exist_ok=True)
        _write_json(plan_path, plan)
        print(check_disk(out, estimate_bytes(ds.data.column(text_column).nbytes, len(ds))))
        splits = _split(ds, out / PARTS)
    except OSError as e:
        raise UserError(f"cannot write {out}: {one_line(e)}", "check that --data-root is writable") from e

    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one bar for the whole job instead of one per shard
    tokens: dict[str, int] = {}
    try:
        desc = f"tokenising {source} ({num_proc} processes)"
        with tqdm(total=len(ds), unit="doc", unit_scale=True, desc=desc) as bar:
            for split, docs in splits.items():
                if (out / f"{split}.bin").is_file() and not (out / PARTS / split).exists():
                    tokens[split] = (out / f"{split}.bin").stat().st_size // 2  # finished before an interruption
                    bar.update(len(docs))
                    continue
                parts = out / PARTS / split
                parts.mkdir(parents=True, exist_ok=True)
                n = plan["shards"][split]
                done = _progress(parts)["next"]
                for i in range(n):
                    shard = docs.shard(num_shards=n, index=i, contiguous=True)
                    if i >= done and not (parts / f"{i:05d}.bin").is_file():
                        _tokenize_shard(shard, parts / f"{i:05d}.bin", text_column, num_proc)
                    bar.update(len(shard))
                tokens[split] = _assemble(out, split, n)
                bar.set_postfix({f"{s}_tokens": f"{t:,}" for s, t in tokens.items()}, refresh=False)
    except OSError as e:
        raise UserError(f"cannot write {out}: {one_line(e)}",
                        "free disk space, then run the same command again: finished shards are kept") from e
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    meta = {"name": name, "encoding": "gpt2", "vocab_size": GPT2_VOCAB_SIZE,
            "train_tokens": tokens["train"], "val_tokens": tokens["val"], "dtype": "uint16",
            "source": source, "documents": plan["documents"], "plan": plan,
            "created": fmt.utc_timestamp()}
    _write_json(out / "meta.json", meta)
    shutil.rmtree(out / PARTS, ignore_errors=True)
    return {**meta, "data_dir": str(out)}
