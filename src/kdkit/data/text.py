"""Text datasets: the Debian fortunes topics, CSV/JSONL files, plain folders, and local files through ``datasets``.

Each builder reads raw texts and labels, makes a fixed split (seeded, the same for every run), and tokenises
every text once with :func:`kdkit.hf.text.tokenize` (cached on disk). The result is a
:class:`~kdkit.data.core.DataSplits` of :class:`~kdkit.data.core.ArrayData` whose ``x`` holds token ids; its
``info["text"]`` records the tokenizer's vocabulary size and pad id, which kdkit fills into text models
(``boe``, ``bilstm``, ``tiny_bert``) and checks every model against. Options shared by every builder:

- ``tokenizer``: the student's tokenizer, a local directory or ``minilm`` (required);
- ``teacher_tokenizer``: the teacher's, when it differs (each tokenises the raw text; detected when equal);
- ``max_length``: tokens per text (truncated, right-padded); ``bucket``: length-bucketed training batches;
- ``cache_dir``: where tokenised ids are kept (default ``$KDKIT_CACHE_DIR/text`` or ``~/.cache/kdkit/text``).

Reading the files needs nothing optional; tokenising needs the extra ``hf``.
"""

from __future__ import annotations

import csv as _csv
import json
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import KdkitError
from .builtin import DATASETS
from .core import DataSplits, fixed_split

FORTUNES_ROOT = "/usr/share/games/fortunes"


def read_fortune_file(path: Union[str, Path]) -> List[str]:
    """The quotations of one fortune file: blocks separated by lines holding a single ``%``, stripped, the
    empty ones dropped."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    quotes, block = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            quotes.append("\n".join(block).strip())
            block = []
        else:
            block.append(line)
    quotes.append("\n".join(block).strip())
    return [q for q in quotes if q]


def fortune_topics(root: Union[str, Path] = FORTUNES_ROOT) -> List[Tuple[str, int]]:
    """``(topic, number of quotations)`` of every topic file under ``root``, largest first (ties by name).

    Topic files are the plain files without a suffix (``people``, ``computers``); ``.dat`` indexes and
    ``.u8`` links are skipped.

    Raises:
        KdkitError: the folder is missing (``apt-get install fortunes fortunes-min``) or holds no topic file.
    """
    base = Path(root)
    if not base.is_dir():
        raise KdkitError(f"fortunes not found at {base}; install them with `apt-get install fortunes fortunes-min` "
                         "(or set data.root to a folder of fortune files)")
    files = [p for p in sorted(base.iterdir()) if p.is_file() and not p.is_symlink() and "." not in p.name]
    counts = [(p.name, len(read_fortune_file(p))) for p in files]
    counts = [c for c in counts if c[1] > 0]
    if not counts:
        raise KdkitError(f"no fortune topic files in {base}; expected files of quotations separated by '%' lines")
    return sorted(counts, key=lambda c: (-c[1], c[0]))


def _labels(values: Sequence[Any], where: str) -> Tuple[List[int], List[Any]]:
    """Class index per value and the sorted class list (numbers numerically, else as strings)."""
    if not values:
        raise KdkitError(f"{where}: no samples; expected at least one text with a label")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        classes: List[Any] = sorted(set(values))
    else:
        values = [str(v) for v in values]
        classes = sorted(set(values))
    pos = {c: i for i, c in enumerate(classes)}
    return [pos[v] for v in values], classes


def text_splits(texts: Sequence[str], labels: Sequence[int], classes: Sequence[Any], *, tokenizer: Any,
                max_length: int, teacher_tokenizer: Any = None, val_fraction: float = 0.1,
                test_fraction: float = 0.2, seed: int = 0, bucket: bool = True, cache_dir: Optional[str] = None,
                source: str = "") -> DataSplits:
    """Tokenise ``texts`` once (cached) and cut a fixed seeded split into a :class:`DataSplits`."""
    from ..hf.text import text_info, tokenize

    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise KdkitError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) and "
                         "leave training samples")
    data = tokenize(texts, labels, tokenizer, max_length, teacher_tokenizer=teacher_tokenizer,
                    bucket_by_length=bucket, cache_dir=cache_dir)
    n_val, n_test = int(len(texts) * val_fraction), int(len(texts) * test_fraction)
    tr, va, te = fixed_split(len(texts), n_val, n_test, seed=seed)
    val = data.subset(va) if n_val else None
    test = data.subset(te) if n_test else None
    info = {"source": source, "classes": list(classes), "train": len(tr), "val": len(va), "test": len(te),
            "text": text_info(tokenizer, max_length, teacher_tokenizer)}
    return DataSplits(data.subset(tr), val, test, num_classes=len(classes), input_shape=(int(max_length),),
                      info=info)


@DATASETS.register("fortunes_topics")
def fortunes_topics(tokenizer: Optional[str] = None, max_length: int = 64, topics: Union[int, List[str]] = 8,
                    teacher_tokenizer: Optional[str] = None, root: str = FORTUNES_ROOT,
                    per_topic: Optional[int] = None, val_fraction: float = 0.1, test_fraction: float = 0.2,
                    bucket: bool = True, cache_dir: Optional[str] = None, seed: int = 0) -> DataSplits:
    """Which topic file a Debian fortune comes from: the ``topics`` largest topic files (an int, default 8:
    people, definitions, cookie, computers, songs-poems, politics, miscellaneous, work), or a list of names.

    ``per_topic``: keep at most this many quotations per topic (the first ones, in file order). Fixed seeded
    split: ``test_fraction`` test, ``val_fraction`` validation, the rest training.
    """
    if tokenizer is None:
        raise KdkitError("dataset 'fortunes_topics' needs data.tokenizer (a local tokenizer/model folder or minilm)")
    available = fortune_topics(root)
    if isinstance(topics, int):
        if topics < 2:
            raise KdkitError(f"fortunes_topics: topics must be at least 2; given {topics}")
        names = [t for t, _ in available[:topics]]
    else:
        known = {t for t, _ in available}
        missing = [t for t in topics if t not in known]
        if missing:
            raise KdkitError(f"fortunes_topics: no topic file {missing[0]!r} in {root}; known: "
                             f"{', '.join(sorted(known))}")
        names = list(topics)
    texts: List[str] = []
    labels: List[int] = []
    for label, name in enumerate(names):
        quotes = read_fortune_file(Path(root) / name)[:per_topic]
        texts += quotes
        labels += [label] * len(quotes)
    return text_splits(texts, labels, names, tokenizer=tokenizer, max_length=max_length,
                       teacher_tokenizer=teacher_tokenizer, val_fraction=val_fraction, test_fraction=test_fraction,
                       seed=seed, bucket=bucket, cache_dir=cache_dir, source=str(root))


def _read_records(path: Path, fmt: str) -> List[dict]:
    try:
        if fmt == "csv":  # the tabular reader's checks: a row with too many or too few fields names its line
            from .builtin import _read_csv

            header, rows = _read_csv(str(path))
            return [dict(zip(header, fields)) for _, fields in rows]
        rows = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise KdkitError(f"{path} line {n}: expected a JSON object per line")
                    rows.append(row)
        return rows
    except UnicodeDecodeError as e:
        raise KdkitError(f"{path} is not UTF-8 text (byte {e.start}); expected a UTF-8 {fmt} file") from None
    except json.JSONDecodeError as e:
        raise KdkitError(f"{path} line {e.lineno}: not valid JSON ({e.msg}); expected one JSON object per line") \
            from None
    except (_csv.Error, OSError) as e:
        raise KdkitError(f"cannot read {path}: {e}") from None


def _columns(rows: List[dict], text: str, label: str, where: str) -> Tuple[List[str], List[Any]]:
    texts, values = [], []
    for i, row in enumerate(rows):
        for key in (text, label):
            if key not in row:
                raise KdkitError(f"{where}: record {i} has no {key!r} field (fields: {', '.join(map(str, row))}); "
                                 f"set text/label to the field names")
        if not isinstance(row[text], str):
            raise KdkitError(f"{where}: record {i}: field {text!r} is not a string")
        texts.append(row[text])
        values.append(row[label])
    return texts, values


def _file_dataset(fmt: str, path: Optional[str], text: str, label: str, **kw: Any) -> DataSplits:
    if path is None or not Path(path).is_file():
        raise KdkitError(f"text_{fmt}: data.path must be an existing {fmt.upper()} file; got {path!r}")
    if kw.get("tokenizer") is None:
        raise KdkitError(f"dataset 'text_{fmt}' needs data.tokenizer (a local tokenizer/model folder or minilm)")
    texts, values = _columns(_read_records(Path(path), fmt), text, label, str(path))
    labels, classes = _labels(values, str(path))
    return text_splits(texts, labels, classes, source=str(path), **kw)


@DATASETS.register("text_csv")
def text_csv(path: Optional[str] = None, tokenizer: Optional[str] = None, text: str = "text", label: str = "label",
             max_length: int = 128, teacher_tokenizer: Optional[str] = None, val_fraction: float = 0.1,
             test_fraction: float = 0.2, bucket: bool = True, cache_dir: Optional[str] = None,
             seed: int = 0) -> DataSplits:
    """A CSV file with a header: the ``text`` column is the input, the ``label`` column the class (its distinct
    values, sorted, become classes 0..C-1)."""
    return _file_dataset("csv", path, text, label, tokenizer=tokenizer, max_length=max_length,
                         teacher_tokenizer=teacher_tokenizer, val_fraction=val_fraction, test_fraction=test_fraction,
                         bucket=bucket, cache_dir=cache_dir, seed=seed)


@DATASETS.register("text_jsonl")
def text_jsonl(path: Optional[str] = None, tokenizer: Optional[str] = None, text: str = "text", label: str = "label",
               max_length: int = 128, teacher_tokenizer: Optional[str] = None, val_fraction: float = 0.1,
               test_fraction: float = 0.2, bucket: bool = True, cache_dir: Optional[str] = None,
               seed: int = 0) -> DataSplits:
    """A JSON-lines file, one object per line with a ``text`` and a ``label`` field."""
    return _file_dataset("jsonl", path, text, label, tokenizer=tokenizer, max_length=max_length,
                         teacher_tokenizer=teacher_tokenizer, val_fraction=val_fraction, test_fraction=test_fraction,
                         bucket=bucket, cache_dir=cache_dir, seed=seed)


@DATASETS.register("text_folder")
def text_folder(root: Optional[str] = None, tokenizer: Optional[str] = None, max_length: int = 128,
                teacher_tokenizer: Optional[str] = None, suffix: str = ".txt", val_fraction: float = 0.1,
                test_fraction: float = 0.2, bucket: bool = True, cache_dir: Optional[str] = None,
                seed: int = 0) -> DataSplits:
    """Plain text files laid out as ``root/<label>/<file>.txt``: one folder per class (sorted names), one text per
    file."""
    if root is None or not Path(root).is_dir():
        raise KdkitError(f"text_folder: data.root must be a folder of class sub-folders; got {root!r}")
    if tokenizer is None:
        raise KdkitError("dataset 'text_folder' needs data.tokenizer (a local tokenizer/model folder or minilm)")
    classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    texts: List[str] = []
    labels: List[int] = []
    for label, cls in enumerate(classes):
        for f in sorted((Path(root) / cls).iterdir()):
            if f.is_file() and f.suffix == suffix:
                texts.append(f.read_text(encoding="utf-8", errors="replace").strip())
                labels.append(label)
    if not texts:
        raise KdkitError(f"text_folder: no {suffix} files in class sub-folders of {root}")
    return text_splits(texts, labels, classes, tokenizer=tokenizer, max_length=max_length,
                       teacher_tokenizer=teacher_tokenizer, val_fraction=val_fraction, test_fraction=test_fraction,
                       seed=seed, bucket=bucket, cache_dir=cache_dir, source=str(root))


@DATASETS.register("hf_dataset")
def hf_dataset(path: Optional[str] = None, format: str = "json", tokenizer: Optional[str] = None,
               text: str = "text", label: str = "label", split: str = "train", max_length: int = 128,
               teacher_tokenizer: Optional[str] = None, val_fraction: float = 0.1, test_fraction: float = 0.2,
               bucket: bool = True, cache_dir: Optional[str] = None, seed: int = 0) -> DataSplits:
    """Local files read by the ``datasets`` library (``format``: json, csv, parquet, text, ...; ``path``: a file
    or glob), never the hub. Integer labels (a ``ClassLabel`` column) are kept; others are mapped to classes."""
    if tokenizer is None:
        raise KdkitError("dataset 'hf_dataset' needs data.tokenizer (a local tokenizer/model folder or minilm)")
    if path is None or not any(Path().glob(path) if not Path(path).is_absolute() else [Path(path)]):
        raise KdkitError(f"hf_dataset: data.path must name local files (a file or a glob); got {path!r}")
    try:
        import datasets
    except ImportError:
        raise KdkitError("dataset 'hf_dataset' needs the optional extra 'hf': pip install 'kdkit[hf]'") from None
    try:
        ds = datasets.load_dataset(format, data_files=path, split=split)
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, ValueError, DatasetGenerationError)
        raise KdkitError(f"hf_dataset: cannot read {path} as {format}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    missing = [c for c in (text, label) if c not in ds.column_names]
    if missing:
        raise KdkitError(f"hf_dataset: {path} has no column {missing[0]!r} (columns: {', '.join(ds.column_names)})")
    texts, values = list(ds[text]), list(ds[label])
    feature = ds.features.get(label)
    if hasattr(feature, "names"):  # ClassLabel: ids stay, names are the classes
        labels, classes = [int(v) for v in values], list(feature.names)
    else:
        labels, classes = _labels(values, str(path))
    return text_splits(texts, labels, classes, tokenizer=tokenizer, max_length=max_length,
                       teacher_tokenizer=teacher_tokenizer, val_fraction=val_fraction, test_fraction=test_fraction,
                       seed=seed, bucket=bucket, cache_dir=cache_dir, source=str(path))


def check_text_model(model: torch.nn.Module, data: Any, where: str, num_classes: Optional[int] = None) -> None:
    """Refuse a text model that would silently compute garbage on ``data`` (tokenised :class:`ArrayData`).

    - pad ids differ (the model would attend to padding, or mask real tokens);
    - a token id of the data is beyond the model's vocabulary (tokenised with another tokenizer);
    - the model has a different number of labels than the dataset has classes.
    """
    pad = getattr(data, "pad_token_id", None)
    x = getattr(data, "x", None)
    if pad is None or x is None or x.is_floating_point():
        return
    m_pad = getattr(model, "pad_token_id", None)
    if m_pad is not None and int(m_pad) != int(pad):
        raise KdkitError(f"{where}: the model's pad id is {m_pad} but the data was padded with {pad}; expected the "
                         "model's own tokenizer (give it as the data's tokenizer / teacher_tokenizer)")
    vocab = getattr(model, "vocab_size", None)
    if vocab is not None and x.numel() and int(x.max()) >= int(vocab):
        raise KdkitError(f"{where}: token id {int(x.max())} is beyond the model's vocabulary of {vocab}; the data "
                         "was tokenised with a different tokenizer than the model's")
    labels = getattr(model, "num_labels", None)
    if labels is not None and num_classes is not None and int(labels) != int(num_classes):
        raise KdkitError(f"{where}: the model has {labels} labels but the dataset has {num_classes} classes; "
                         "expected the same label count")
