"""Tiny model directories and datasets for the deployment tests."""

from tiny_runs import sentiment_csv, text_jsonl, tiny_bert_dir, tiny_llama_dir

__all__ = ["sentiment_csv", "text_jsonl", "tiny_bert_dir", "tiny_llama_dir"]
