"""Tiny model directories and datasets for tests that run the pipeline."""

from tiny_runs import sentiment_csv, text_jsonl, tiny_bert_dir, tiny_llama_dir, tiny_vocab_bert_dir

__all__ = ["sentiment_csv", "text_jsonl", "tiny_bert_dir", "tiny_llama_dir", "tiny_vocab_bert_dir"]
