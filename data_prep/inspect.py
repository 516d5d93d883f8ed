"""Look inside a prepared data folder.

    python -m data_prep.inspect data/demo                       # summary + document-length histogram
    python -m data_prep.inspect data/demo --sample 3 --split validation --sequence_length 256

The summary comes from the manifest (sources, documents and tokens per split, what was skipped and
why, duplicates removed, the tokenizer and its hash, the split rule, the folder's `manifest_hash`).
The histogram counts documents by length in tokens (powers of two), as text and as a PNG.
`--sample I` decodes global sample I of a split exactly as the training reader packs it
(`pipeline.data.reader.PackedReader`: same `sequence_length` and `seed` as the run), EOS shown as
`<EOS>`, with the documents it touches. (Run it with `-m`: as a script its folder would shadow the
standard library's `inspect`.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa

from data_prep.cli import run_cli
from pipeline.data.manifest import TOKENS_COLUMN, Manifest, load_manifest, manifest_hash


def document_lengths(manifest: Manifest, split: str) -> np.ndarray:
    """Tokens of every document of a split, from the shards' list offsets (no token is read)."""
    lengths = []
    for shard in manifest.split(split).shards:
        reader = pa.ipc.open_file(pa.memory_map(str(manifest.shard_path(shard)), "r"))
        for b in range(reader.num_record_batches):
            lengths.append(np.diff(reader.get_batch(b).column(TOKENS_COLUMN).offsets.to_numpy()))
    return np.concatenate(lengths) if lengths else np.zeros(0, np.int64)


def histogram(lengths: Dict[str, np.ndarray]) -> tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Counts per power-of-two bin [2^k, 2^(k+1)) of every split, over the same bins."""
    top = max((int(v.max()) for v in lengths.values() if len(v)), default=1)
    low = min((int(v.min()) for v in lengths.values() if len(v)), default=1)
    edges = 2 ** np.arange(int(np.log2(max(low, 1))), int(np.log2(max(top, 1))) + 2)
    return edges, {name: np.histogram(v, bins=edges)[0] for name, v in lengths.items()}


def summary(manifest: Manifest) -> List[str]:
    stats, tok = manifest.extra.get("stats", {}), manifest.tokenizer
    lines = [f"data folder {manifest.data_dir}  (manifest_hash {manifest_hash(manifest)[:16]}...)"]
    for source in manifest.extra.get("sources", []):
        detail = ", ".join(f"{k} {v}" for k, v in source.items() if k != "name")
        lines.append(f"  source {source.get('name', '?')}: {detail}")
    lines.append(f"  tokenizer {tok.type} {tok.path}: vocab {tok.vocab_size}, eos {tok.eos_id}, "
                 f"sha256 {tok.sha256[:16]}..., tokens stored as {manifest.token_dtype}")
    for name, sp in manifest.splits.items():
        lines.append(f"  {name:<10} {sp.documents:>10,} documents {sp.tokens:>14,} tokens {len(sp.shards):>5} shards"
                     + (f" {sp.extra['text_bytes'] / 1e6:,.1f} MB of text" if "text_bytes" in sp.extra else ""))
    if "documents_read" in stats:
        lines.append(f"  documents read {stats['documents_read']:,} = written {stats['documents_written']:,} + "
                     f"duplicates {stats['duplicates_removed']:,} (dedupe {stats['dedupe']}) + skipped "
                     f"{sum(stats['skipped'].values()):,}")
        for reason, n in stats["skipped"].items():
            where = stats.get("skipped_at", {}).get(reason, [])
            lines.append(f"    {reason:<20} {n:>8,}" + (f"  first: {'; '.join(where[:3])}" if where else ""))
    elif stats:
        lines.append(f"  (written before per-reason accounting) empty documents: {stats.get('empty_documents', 0)}")
    rule = manifest.extra.get("split_rule")
    if rule:
        lines.append(f"  split: {rule.get('method')} of {rule.get('key')}, val_fraction {rule.get('val_fraction')}, "
                     f"seed {rule.get('split_seed')}" + (f", forced {rule['forced']}" if rule.get("forced") else ""))
    return lines


def _plot(edges: np.ndarray, counts: Dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, c in counts.items():
        ax.stairs(c, edges, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def inspect(data_dir: str, sample: Optional[int] = None, split: str = "train", sequence_length: int = 128,
            seed: int = 1234, png: Optional[str] = None) -> None:
    """Print a data folder's summary and document-length histogram; optionally decode one sample.

    Args:
        data_dir: Folder with manifest.json (written by data_prep).
        sample: Decode this global sample index of `--split` as the training reader packs it.
        split: Split for `--sample`.
        sequence_length: The run's data.sequence_length (a sample is sequence_length + 1 tokens).
        seed: The run's data.seed (the sample order).
        png: Where to write the histogram plot (default: <data_dir>/token_lengths.png).
    """
    manifest = load_manifest(data_dir)
    print("\n".join(summary(manifest)))
    lengths = {name: document_lengths(manifest, name) for name in manifest.splits}
    edges, counts = histogram(lengths)
    print("\ndocument length (tokens)  " + "  ".join(f"{name:>10}" for name in counts))
    widest = max((int(c.max()) for c in counts.values() if len(c)), default=1) or 1
    for i in range(len(edges) - 1):
        row = [int(c[i]) for c in counts.values()]
        bar = "#" * int(round(30 * row[0] / widest)) if row else ""
        print(f"  [{edges[i]:>7}, {edges[i + 1]:>7})  " + "  ".join(f"{n:>10,}" for n in row) + f"  {bar}")
    for name, v in lengths.items():
        if len(v):
            print(f"  {name}: median {int(np.median(v))}, mean {v.mean():.1f}, max {int(v.max())} tokens")
    path = Path(png) if png else Path(data_dir) / "token_lengths.png"
    try:
        _plot(edges, counts, path)
        print(f"histogram plot: {path}")
    except OSError as err:
        print(f"histogram plot not written ({path}: {err.strerror})")
    if sample is not None:
        _show_sample(manifest, split, sample, sequence_length, seed)


def _show_sample(manifest: Manifest, split: str, index: int, sequence_length: int, seed: int) -> None:
    import sentencepiece as spm

    from pipeline.data.reader import PackedReader

    reader = PackedReader(manifest.data_dir, split=split, sequence_length=sequence_length, seed=seed,
                          manifest=manifest)
    tokens = reader.sample_tokens(index).tolist()
    sp = spm.SentencePieceProcessor(model_file=str(manifest.tokenizer_path))
    eos = manifest.tokenizer.eos_id
    pieces, run = [], []
    for t in tokens + [eos]:  # decode runs between EOS tokens; the extra EOS only closes the last run
        if t == eos:
            pieces.append(sp.decode(run))
            run = []
        else:
            run.append(t)
    text = "<EOS>".join(pieces)
    print(f"\nsample {index} of split '{split}' (window {reader.window_of(index)} of {reader.num_windows}, "
          f"{len(tokens)} tokens = sequence_length + 1, seed {seed})")
    print(f"documents: {', '.join(reader.sample_documents(index))}")
    print(f"tokens: {tokens}")
    print("text:\n" + text)


if __name__ == "__main__":
    run_cli(inspect, positional=True)
