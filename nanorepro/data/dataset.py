"""A dataset: Tiny Shakespeare (bundled, or downloaded) and text files into token files (char or GPT-2 BPE).

Tiny Shakespeare and GPT-2's BPE files ship inside the package (`bundled/`, gzipped, checked against
their published sha256 when read), so preparing needs no network; `url=` downloads a mirror instead.
`prepare` writes `<data_root>/<name>_<encoding>/{train.bin, val.bin, meta.json}` as nanoGPT's
shakespeare_char and shakespeare prepare.py do (first 90% of the characters train; uint16 ids), with
the vocabulary as JSON, not a pickle. meta.json is written last: a folder with one is complete.
No torch here (batches are gpt/batches.py); tiktoken is imported only for the gpt2 encoding.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import importlib.resources
import json
import os
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from nanorepro import fmt
from nanorepro.errors import ModelUnavailable, UserError
from nanorepro.files import sha256_file, write_atomic, write_text_atomic

CANONICAL_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
ENCODINGS = ("char", "gpt2")
GPT2_VOCAB_SIZE = 50257  # the true size; nanoGPT's model pads it to 50304 for speed
MAX_CHAR_VOCAB = 65535  # ids are stored as uint16
MIN_SPLIT_TOKENS = 2  # a split needs at least one (input, target) pair
TRAIN_FRACTION = 0.9
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CHUNK = 1 << 16

BUNDLED = "bundled"  # the package folder holding the gzipped copies below
SHAKESPEARE_BUNDLED = "tinyshakespeare.txt.gz"  # char-rnn's data/tinyshakespeare/input.txt
BUNDLED_SOURCE = f"nanorepro/{BUNDLED}/{SHAKESPEARE_BUNDLED} (a copy of {CANONICAL_URL})"
# tiktoken's gpt2 encoding: the bundled copy, the URL tiktoken reads (its cache names files by the
# URL's sha1) and the sha256 tiktoken checks (tiktoken_ext/openai_public.py)
GPT2_BPE_FILES = {
    "gpt2-vocab.bpe.gz": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                          "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "gpt2-encoder.json.gz": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                             "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


def default_cache_dir() -> Path:
    """$NANOREPRO_CACHE, else ~/.cache/nanorepro."""
    env = os.environ.get("NANOREPRO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanorepro"


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line (the CLI prints errors as one line)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bundled(name: str, sha256: str) -> bytes:
    """The decompressed bytes of a file shipped in nanorepro/bundled/, checked against `sha256`."""
    try:
        raw = gzip.decompress((importlib.resources.files("nanorepro") / BUNDLED / name).read_bytes())
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"the bundled {name} cannot be read: {one_line(e)}", "reinstall nanorepro") from e
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise UserError(f"the bundled {name} does not match sha256 {sha256[:12]}... (damaged install)",
                        "reinstall nanorepro")
    return raw


def shakespeare_text() -> str:
    """Tiny Shakespeare from the package's own verified copy: no network needed."""
    return bundled(SHAKESPEARE_BUNDLED, SHAKESPEARE_SHA256).decode("utf-8")


def _shakespeare_cache(cache_dir: str | Path | None) -> Path:
    """Where Tiny Shakespeare's `input.txt` is cached: downloaded there, or written from the bundled copy."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return cache / "tinyshakespeare" / "input.txt"


def _write_cached(dest: Path, raw: bytes, what: str, fix: str) -> None:
    """`raw` written atomically into a cache folder, made first; UserError naming `what` when it cannot be."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, lambda f: f.write(raw))
    except OSError as e:
        raise UserError(f"cannot write {what}: {one_line(e)}", fix) from e


def shakespeare_file(cache_dir: str | Path | None = None) -> Path:
    """A verified Tiny Shakespeare `input.txt` in the cache, written from the bundled copy when missing
    or changed: for tools that need a file, such as nanoGPT's prepare.py."""
    dest = _shakespeare_cache(cache_dir)
    if not (dest.is_file() and sha256_file(dest) == SHAKESPEARE_SHA256):
        _write_cached(dest, bundled(SHAKESPEARE_BUNDLED, SHAKESPEARE_SHA256), f"the cache {dest.parent.parent}",
                      "set NANOREPRO_CACHE or --cache-dir to a writable folder")
    return dest


def fetch_shakespeare(cache_dir: str | Path | None = None, url: str = CANONICAL_URL,
                      sha256: str = SHAKESPEARE_SHA256, timeout: float = 60) -> Path:
    """A verified Tiny Shakespeare in the cache, downloaded from `url` if needed (for a mirror;
    `shakespeare_text()` needs no network). The cached copy is re-hashed on every call; a download
    replaces it only once its sha256 matches, so a failed download never leaves a file that passes."""
    from tqdm import tqdm

    dest = _shakespeare_cache(cache_dir)
    if dest.is_file():
        if sha256_file(dest) == sha256:
            return dest
        print(f"cached {dest} does not match sha256 {sha256[:12]}..., downloading it again")
    fix = ("check the network (or the URL), or leave out the URL to use the bundled copy, "
           "or pass --input / set NANOREPRO_INPUT to a local copy")

    def download(out) -> None:
        h, got = hashlib.sha256(), 0
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"download {Path(url).name}") as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if total is not None and got != total:
            raise UserError(f"download of {url} was cut short: {got:,} of {total:,} bytes", fix)
        if h.hexdigest() != sha256:
            raise UserError(f"download of {url} has sha256 {h.hexdigest()}, expected {sha256} "
                            f"({got:,} bytes; corrupted or not the expected file)", fix)

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the download cache {dest.parent.parent}: {one_line(e)}",
                        "set NANOREPRO_CACHE or --cache-dir to a writable folder") from e
    try:
        write_atomic(dest, download)
    except (OSError, http.client.HTTPException, ValueError) as e:
        # URLError, HTTPError and timeouts are OSErrors; a connection closed early can be IncompleteRead
        raise UserError(f"could not download {url}: {one_line(e)}", fix) from e
    return dest


_TIKTOKEN_VARS = ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")  # where tiktoken looks, in its order


def tiktoken_cache_dir() -> Path | None:
    """Where tiktoken reads the gpt2 files: $TIKTOKEN_CACHE_DIR (or $DATA_GYM_CACHE_DIR) when set, else
    <cache>/tiktoken (see `gpt2_encoding`); None when the user turned tiktoken's cache off (set empty)."""
    for var in _TIKTOKEN_VARS:
        if var in os.environ:
            return Path(os.environ[var]).expanduser() if os.environ[var] else None
    return default_cache_dir() / "tiktoken"


def install_gpt2_bpe() -> Path | None:
    """Put the bundled GPT-2 BPE files where tiktoken looks for them (named by the sha1 of their URL) unless
    a verified copy is there; that folder, or None when tiktoken's cache is turned off."""
    folder = tiktoken_cache_dir()
    if folder is None:
        return None
    for name, (url, sha256) in GPT2_BPE_FILES.items():
        dest = folder / hashlib.sha1(url.encode()).hexdigest()
        if dest.is_file() and sha256_file(dest) == sha256:
            continue
        _write_cached(dest, bundled(name, sha256), f"tiktoken's cache {folder}",
                      "set TIKTOKEN_CACHE_DIR (or NANOREPRO_CACHE) to a writable folder")
    return folder


def gpt2_encoding():
    """tiktoken's own `gpt2` encoding, read from the bundled BPE files: never a download."""
    try:
        import tiktoken
    except ImportError as e:
        raise UserError("the gpt2 encoding needs tiktoken, which is not installed",
                        "pip install 'nanorepro[train]' (or tiktoken==0.14.0)") from e
    folder = install_gpt2_bpe()
    # without a folder of the user's, point tiktoken at ours while it loads, not at its shared temp folder
    ours = not any(v in os.environ for v in _TIKTOKEN_VARS)
    try:
        if ours:
            os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError, ImportError) as e:  # requests' errors are OSErrors; ValueError: bad hash
        raise ModelUnavailable(f"tiktoken could not get the GPT-2 BPE files ({type(e).__name__}: {one_line(e)})",
                               "set TIKTOKEN_CACHE_DIR to a folder, or unset it (set empty, it turns off the "
                               "cache that nanorepro fills from its bundled copy), or connect to the network") from e
    finally:
        if ours:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)


def _read_text(path: Path) -> tuple[str, str]:
    """(text, sha256 of the file's bytes) of a UTF-8 file, with one clear error for each bad case."""
    if not path.is_file():
        raise UserError(f"input {path} is not a file" if path.exists() else f"input file {path} does not exist",
                        "pass an existing UTF-8 text file to --input")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read input file {path}: {one_line(e)}", "check its permissions") from e
    if not raw:
        raise UserError(f"input file {path} is empty", "pass a text file with some text in it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"input file {path} is not UTF-8 text (byte {e.start}: {e.reason})",
                        "convert it to UTF-8, e.g. `iconv -t UTF-8 in.txt > out.txt`") from e
    return text, hashlib.sha256(raw).hexdigest()


def _encode_char(text: str) -> tuple[np.ndarray, list[str]]:
    """All of `text` as ids into its sorted character set (nanoGPT's shakespeare_char vocabulary)."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    chars, ids = np.unique(codepoints, return_inverse=True)
    if len(chars) > MAX_CHAR_VOCAB:
        raise UserError(f"the text has {len(chars):,} distinct characters; the char encoding stores ids as "
                        f"uint16 and allows at most {MAX_CHAR_VOCAB:,}", "use --encoding gpt2 for this text")
    return ids.astype(np.uint16), [chr(c) for c in chars]


def _encode(text: str, encoding: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(train ids, val ids, encoding-specific meta): the text is split 90/10 by characters first."""
    n = int(len(text) * TRAIN_FRACTION)
    if encoding == "char":
        ids, itos = _encode_char(text)
        return ids[:n], ids[n:], {"vocab_size": len(itos), "itos": itos}
    enc = gpt2_encoding()
    train = np.array(enc.encode_ordinary(text[:n]), dtype=np.uint16)
    val = np.array(enc.encode_ordinary(text[n:]), dtype=np.uint16)
    return train, val, {"vocab_size": GPT2_VOCAB_SIZE}


def complete_meta(out: Path) -> dict | None:
    """A prepared folder's meta.json when its train.bin and val.bin hold the tokens it counts; else None."""
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
        if all((out / f"{s}.bin").stat().st_size == 2 * int(meta[f"{s}_tokens"]) for s in ("train", "val")):
            return meta
    except (OSError, KeyError, TypeError, ValueError):  # no folder, a damaged meta.json, or a missing bin
        pass
    return None


def _reusable(out: Path, sha: str, encoding: str) -> dict | None:
    """The folder's meta if it already holds this source in this encoding, complete; else None."""
    meta = complete_meta(out)
    return meta if meta and meta.get("source_sha256") == sha and meta.get("encoding") == encoding else None


def check_name(name: str) -> str:
    """A dataset name usable as a folder name (`<name>_<encoding>`), or a UserError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UserError(f"bad dataset name {name!r}",
                        "use letters, digits, '.', '_' or '-' (it becomes the folder <name>_<encoding>)")
    return name


def _check_encodings(encodings: Iterable[str]) -> tuple[str, ...]:
    encodings = (encodings,) if isinstance(encodings, str) else tuple(encodings)
    bad = [enc for enc in encodings if enc not in ENCODINGS]
    if bad or not encodings:
        raise UserError(f"unknown encoding {bad[0]!r}" if bad else "no encoding given",
                        f"use one of: {', '.join(ENCODINGS)} or all")
    return tuple(dict.fromkeys(encodings))


def prepare(input_path: str | Path | None = None, name: str = "shakespeare",
            encodings: tuple[str, ...] = ENCODINGS, data_root: str | Path = "data",
            cache_dir: str | Path | None = None, url: str | None = None) -> list[dict]:
    """Encode a text into `<data_root>/<name>_<encoding>/` for each encoding; return their metas.
    The text is `input_path`, else $NANOREPRO_INPUT, else Tiny Shakespeare (bundled, or from `url`).
    A folder already holding the same source (by sha256) in the same encoding is reused as it is."""
    check_name(name)
    encodings = _check_encodings(encodings)
    if input_path and url:
        raise UserError("both an input file and a URL were given", "pass one: --input FILE or --url URL")
    input_path = input_path or os.environ.get("NANOREPRO_INPUT") or None
    if input_path:
        path = Path(input_path).expanduser()
        text, sha = _read_text(path)
        source = str(path.resolve())
    else:  # Tiny Shakespeare, read (or downloaded) only when a folder is to be written
        text, sha, source = None, SHAKESPEARE_SHA256, url or BUNDLED_SOURCE
    metas = []
    for encoding in encodings:
        out = Path(data_root) / f"{name}_{encoding}"
        meta = _reusable(out, sha, encoding)
        if meta is not None:
            print(f"reusing {out}: it already holds this source (sha256 {sha[:12]}...) as {encoding}")
        else:
            if text is None:
                text = _read_text(fetch_shakespeare(cache_dir, url=url))[0] if url else shakespeare_text()
            meta = _write_dataset(out, text, name, encoding, source, sha)
        metas.append({**meta, "data_dir": str(out)})
    return metas


def _write_dataset(out: Path, text: str, name: str, encoding: str, source: str, sha: str) -> dict:
    train, val, extra = _encode(text, encoding)
    for split, ids in (("train", train), ("val", val)):
        if len(ids) < MIN_SPLIT_TOKENS:
            raise UserError(f"the text is too short: {len(text):,} characters give {len(ids)} {split} "
                            f"token(s) with the {encoding} encoding (need at least {MIN_SPLIT_TOKENS})",
                            "use a longer text file")
    meta = {"name": name, "encoding": encoding, **extra, "train_tokens": int(len(train)), "val_tokens": int(len(val)),
            "dtype": "uint16", "source": source, "source_sha256": sha,
            "created": fmt.utc_timestamp()}
    try:
        out.mkdir(parents=True, exist_ok=True)
        # the folder stops being "complete" before any bin changes, so a crash can't pair old meta with new bins
        (out / "meta.json").unlink(missing_ok=True)
        write_atomic(out / "train.bin", train.tofile)
        write_atomic(out / "val.bin", val.tofile)
        # one key per line, the vocabulary on one line: readable with `cat` even for big vocabularies
        lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in meta.items()]
        write_text_atomic(out / "meta.json", "{\n" + ",\n".join(lines) + "\n}\n")
    except OSError as e:
        reason, needed = one_line(e), 2 * (len(train) + len(val))
        try:  # numpy reports a short write without an errno: say when it is a full disk
            free = shutil.disk_usage(out).free
            reason += f"; the disk is full ({free:,} bytes free, {needed:,} needed)" if free < needed else ""
        except OSError:
            pass
        raise UserError(f"cannot write {out}: {reason}",
                        "check that --data-root is writable and has space") from e
    return meta


def summary(meta: dict) -> str:
    """One human line, e.g. `shakespeare_char: char, vocab 65, train 1,003,854 tokens, ...`."""
    folder = f"{meta['name']}_{meta['encoding']}"
    return (f"{folder}: {meta['encoding']}, vocab {meta['vocab_size']:,}, train {meta['train_tokens']:,} tokens, "
            f"val {meta['val_tokens']:,} tokens -> {meta.get('data_dir', folder)}")


_META_KEYS = ("name", "encoding", "vocab_size", "train_tokens", "val_tokens", "dtype")


# Each preset dataset's vocabulary before it is prepared (estimates on the hub, before `prepare`): the
# bundled Tiny Shakespeare has 65 characters; the others are GPT-2 BPE. A prepared meta.json wins.
DATASET_VOCAB = {"shakespeare_char": 65, "shakespeare_gpt2": GPT2_VOCAB_SIZE, "openwebtext_gpt2": GPT2_VOCAB_SIZE}


def vocab_size_of(data_root: str | Path, dataset: str) -> tuple[int, str]:
    """(vocabulary size, where it came from) of a dataset, prepared or not; GPT-2's for an unknown one."""
    try:
        return load_meta(Path(data_root) / dataset)["vocab_size"], f"prepared in {Path(data_root) / dataset}"
    except UserError:
        pass
    if dataset in DATASET_VOCAB:
        return DATASET_VOCAB[dataset], f"{dataset} as `nanorepro prepare` makes it (not prepared here)"
    return GPT2_VOCAB_SIZE, f"{dataset} is not prepared here: GPT-2's vocabulary assumed"


def load_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared folder, plus `data_dir` (where it was read; not stored in the file)."""
    path = Path(data_dir) / "meta.json"
    fix = "run `nanorepro prepare` (see --data-root/--name) to make it"
    if not path.is_file():
        raise UserError(f"{data_dir} is not a prepared dataset (no meta.json)", fix)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {one_line(e)}", "re-run `nanorepro prepare`") from e
    missing = [k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing or meta["encoding"] not in ENCODINGS or (meta["encoding"] == "char" and "itos" not in meta):
        raise UserError(f"{path} is not a nanorepro meta.json (missing or bad: {', '.join(missing) or 'encoding'})",
                        "re-run `nanorepro prepare`")
    return {**meta, "data_dir": str(data_dir)}


class Codec:
    """Text <-> ids for a prepared dataset's encoding."""

    def __init__(self, encoding: str, vocab_size: int, itos: list[str] | None = None):
        if encoding not in ENCODINGS:
            raise UserError(f"unknown encoding {encoding!r}", f"use one of: {', '.join(ENCODINGS)}")
        self.encoding, self.vocab_size, self.itos = encoding, int(vocab_size), itos
        if encoding == "char":  # load_meta refuses a char dataset without its itos
            self._stoi = {c: i for i, c in enumerate(itos)}
        else:
            self._enc = gpt2_encoding()

    @classmethod
    def from_meta(cls, meta: dict) -> "Codec":
        return cls(meta["encoding"], meta["vocab_size"], meta.get("itos"))

    def encode(self, text: str) -> list[int]:
        if self.encoding == "gpt2":
            return self._enc.encode(text, allowed_special={"<|endoftext|>"})  # as nanoGPT's sample.py
        unknown = sorted(set(text) - self._stoi.keys())
        if unknown:
            raise UserError(f"characters not in the dataset's vocabulary: {''.join(unknown)[:40]!r}",
                            "use only characters that occur in the training text")
        return [self._stoi[c] for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.encoding == "gpt2":
            return self._enc.decode(ids)
        return "".join(self.itos[i] for i in ids)
