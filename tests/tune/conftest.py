from tiny_runs import sentiment_csv, tiny_bert_dir  # noqa: F401  (fixtures)
from tune_runs import readable_split_dir, small_bert_dir, split_dir  # noqa: F401  (fixtures)
