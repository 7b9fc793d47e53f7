"""Logits to text: sampling, constrained-decoding grammars and the incremental detokenizer."""
