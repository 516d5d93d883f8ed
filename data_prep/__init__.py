"""Command-line scripts that turn raw text into a SentencePiece tokenizer and Arrow shards.

    python -m data_prep.prepare --source python-stdlib --out_dir data/demo --vocab_size 4000
    python -m data_prep.train_tokenizer --inputs 'corpus/*.txt' --output tok.model --vocab_size 8000
    python -m data_prep.tokenize_shards --inputs 'corpus/*.jsonl' --tokenizer tok.model --out_dir data/x

The manifest and shard format lives in `pipeline.data.manifest` (shared with the reader).
"""
