"""Training side: datasets over the mined shards, the EGA loss, a hard-batch sampler and a reference trainer."""
from pipeline.train.dataset import IterableShardDataset, ShardDataset, ShardStats, collate_rows, list_shards
from pipeline.train.ega import EGALoss, content_key, ega_from_scores, gather_with_grad, hardness
from pipeline.train.sampler import HardBatchSampler

__all__ = ["EGALoss", "HardBatchSampler", "IterableShardDataset", "ShardDataset", "ShardStats", "collate_rows",
           "content_key", "ega_from_scores", "gather_with_grad", "hardness", "list_shards"]
