"""The tokenizer of an exported model: the run's sentencepiece model with the settings data_prep trained it with.

Without `trust_remote_code` AutoTokenizer loads transformers' own `SentencePieceBackend`, which encodes exactly as
`sentencepiece.encode` (the ids the model was trained on) but decodes byte-fallback pieces literally; with it
(`lm_eval ... trust_remote_code=True`) the exported subclass below, which decodes exactly as sentencepiece does.
"""
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class ExportedTokenizer(SentencePieceBackend):
    def convert_tokens_to_string(self, tokens):
        return self.sp_model.decode_pieces(list(tokens))
